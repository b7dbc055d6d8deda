"""Builds xent_ext._C: the C++/CPU sources always, the CUDA sources when torch is a CUDA build
and nvcc is found (no GPU is needed to compile them).

Knobs (environment variables):
  XENT_FORCE_CPU=1        build without CUDA even where it could be built
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                parallel compile jobs (read by torch's build helper)

Build with `pip install --no-build-isolation -e .`: build isolation would install a second
torch into a throw-away environment and compile against it.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup


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

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def want_cuda() -> bool:
    if os.environ.get("XENT_FORCE_CPU", "0") == "1":
        return False
    # Decided from the toolchain, never from torch.cuda.is_available(): CI compiles the CUDA
    # sources on machines without a GPU.
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


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
ext_kwargs: dict = {"extra_compile_args": {"cxx": cxx_flags}, "extra_link_args": link_flags}

if want_cuda():
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
    version="0.1.0",
    description="Fused cross-entropy for PyTorch: loss and gradient in one pass",
    packages=find_packages(include=["xent_ext", "xent_ext.*"]),
    ext_modules=[Extension("xent_ext._C", srcs, **ext_kwargs)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
