"""Builds xent_ext._C: the C++/CPU sources always, the CUDA sources when torch is a CUDA build
and nvcc is found (no GPU is needed to compile them).

Knobs (environment variables):
  XENT_FORCE_CPU=1        build without CUDA even where it could be built
  XENT_REQUIRE_CUDA=1     fail instead of building CPU-only when CUDA cannot be built (CI)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                parallel compile jobs (read by torch's build helper)

Build with `pip install --no-build-isolation -e .` against the torch already installed: the
extension links against that torch's libraries, so it must be compiled with it (build isolation
would look for torch in an empty build environment and fail).

Builds are incremental: objects live in build/temp.<platform>/ (CPU-only builds in
build/temp.<platform>-cpu/), also for editable installs, whose default is a fresh temporary
directory per build, and ninja recompiles only the sources whose text, included headers or
flags changed. Each build says on one line what it compiles (with or without the CUDA kernels,
and why).
"""

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _torch_or_explain():
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit(
            "xent_ext: building needs PyTorch, and this build environment has none.\n"
            "  pip's default build isolation builds in a fresh environment, without the torch\n"
            "  you have. Install torch first (if you have not), then build against it:\n"
            "    pip install torch\n"
            "    pip install --no-build-isolation .\n"
        )
    return torch


def _locate_cuda_home() -> None:
    """torch guesses CUDA_HOME from the directory above `nvcc` on PATH, which is wrong when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc): prefer the toolkit's own directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if (Path(candidate) / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = candidate
            return


_locate_cuda_home()
torch = _torch_or_explain()
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def why_no_cuda() -> str | None:
    """None when the CUDA sources will be built, else the reason they will not."""
    if os.environ.get("XENT_FORCE_CPU", "0") == "1":
        return "XENT_FORCE_CPU=1"
    # Decided from the toolchain, never from torch.cuda.is_available(): CI compiles the CUDA
    # sources on machines without a GPU.
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc; set CUDA_HOME to the toolkit)"
    return None


def want_cuda() -> bool:
    why = why_no_cuda()
    if why is not None and os.environ.get("XENT_REQUIRE_CUDA", "0") == "1":
        sys.exit(f"xent_ext: XENT_REQUIRE_CUDA=1 but the CUDA sources cannot be built: {why}")
    return why is None


def say_what_is_built() -> None:
    """One line at every build: a build that silently goes CPU-only is a trap on a GPU
    machine, and the other way round a CUDA compile is minutes on a machine without a GPU."""
    if with_cuda:
        what = f"the CPU and CUDA kernels (architectures {os.environ['TORCH_CUDA_ARCH_LIST']})"
    else:
        what = f"the CPU kernels only ({why_no_cuda()})"
    print(f"xent_ext: building {what} against torch {torch.__version__}", file=sys.stderr,
          flush=True)
    if with_cuda and os.environ.get("XENT_REQUIRE_CUDA") != "1" and not torch.cuda.is_available():
        print("xent_ext: no CUDA device here, so the CUDA kernels (minutes to compile) cannot "
              "run; XENT_FORCE_CPU=1 (make test-cpu) builds without them", file=sys.stderr,
              flush=True)


def sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def torch_release() -> str:
    """X.Y.Z of the torch we compile against (no local suffix such as +cu130)."""
    return torch.__version__.split("+")[0]


class IncrementalBuildExtension(BuildExtension):
    """torch's ninja build with a persistent object directory: setuptools' editable install
    would otherwise compile every source again in a new temporary directory."""

    def finalize_options(self):
        super().finalize_options()
        # CPU-only objects apart (their flags differ): switching between `make test-cpu` and
        # `make test` relinks instead of recompiling everything.
        plat = f"{sys.platform}-{sys.implementation.cache_tag}" + ("" if with_cuda else "-cpu")
        self.build_temp = str(ROOT / "build" / f"temp.{plat}")

    def run(self):
        say_what_is_built()
        super().run()
        # After a successful build only, so that the record always describes the _C beside it:
        # in the source tree for in-place and editable builds, else in build_lib, where a
        # wheel collects the package from (build_py has copied the sources there already).
        if self.inplace or getattr(self, "editable_mode", False):
            write_build_info(ROOT / "xent_ext", with_cuda)
        else:
            write_build_info(Path(self.build_lib) / "xent_ext", with_cuda)


def write_build_info(package_dir: Path, cuda: bool) -> None:
    """_build_info.py: what this build was compiled against, read at import time (an
    extension built against one torch fails obscurely, or crashes, under another)."""
    text = (
        "# Written by setup.py at build time; not under version control.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA = {torch.version.cuda if cuda else None!r}\n"
        f"CUDA_ARCHS = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if cuda else ''!r}\n"
    )
    path = package_dir / "_build_info.py"
    if package_dir.is_dir() and (not path.exists() or path.read_text() != text):
        path.write_text(text)


def read_version() -> str:
    """xent_ext/_version.py, read as text: importing the package would need the extension."""
    text = (ROOT / "xent_ext" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


# The C++ standard is left to torch (C++17 or C++20, by version).
cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
link_flags: list[str] = []
# at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`: built
# without -fopenmp, every CPU kernel would run on one thread whatever torch.get_num_threads()
# says.  Linking it names libgomp.so.1, the soname of the copy torch has already loaded, so the
# process keeps one OpenMP runtime and one thread pool.
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
srcs = sources("*.cpp") + sources("cpu/*.cpp")
# Headers too: setuptools skips the whole extension when no listed file is newer than it, so an
# edit to a header alone would otherwise never reach ninja (which tracks includes itself).
headers = sources("**/*.h") + sources("**/*.cuh")
ext_kwargs: dict = {
    "extra_compile_args": {"cxx": cxx_flags},
    "extra_link_args": link_flags,
    "depends": headers,
}

with_cuda = want_cuda()
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    srcs += sources("cuda/*.cu")
    ext_kwargs["extra_compile_args"]["cxx"] += ["-DXENT_WITH_CUDA"]
    ext_kwargs["extra_compile_args"]["nvcc"] = [
        "-O3",
        "-DXENT_WITH_CUDA",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # The static checks read this: registers, spills, shared memory per kernel.
        "-Xptxas=-v",
        "-Xptxas=-warn-spills",
        "-Xcompiler=-Wall",
    ]
    Extension = CUDAExtension
else:
    Extension = CppExtension

setup(
    name="xent_ext",
    version=read_version(),
    description="Fused cross-entropy for PyTorch: loss and gradient in one pass",
    license="MIT",
    packages=find_packages(include=["xent_ext", "xent_ext.*"]),
    ext_modules=[Extension("xent_ext._C", srcs, **ext_kwargs)],
    cmdclass={"build_ext": IncrementalBuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    # The binary links against this torch's C++ libraries: another release cannot load it.
    install_requires=[f"torch=={torch_release()}"],
)
