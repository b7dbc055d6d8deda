"""Refuses to load the compiled extension under a torch other than the one it was built with.

xent_ext/_C links against the C++ libraries of the torch it was compiled with. Under another
release it fails to load with a bare missing-library or missing-symbol error, or loads and
misbehaves later. setup.py records that torch in xent_ext/_build_info.py; this check reads it
before _C is imported and, on a mismatch, raises an ImportError that says what to run.

A mismatch is another torch release (X.Y.Z), or, for a build with the CUDA kernels, a torch
built for another CUDA version (the kernels link that CUDA's runtime). The local part of the
version (+cu130, +cpu) is otherwise not compared: a CPU-only build runs under either.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1'."""
    return version.split("+", 1)[0]


def mismatch(built_version: str, built_cuda: str | None, running_version: str,
             running_cuda: str | None) -> bool:
    if release(built_version) != release(running_version):
        return True
    return built_cuda is not None and built_cuda != running_cuda


def rebuild_command() -> str:
    """How to rebuild against the running torch: in the source checkout when the package is
    one (editable or in-place build), else from wherever the source is."""
    pip = f"{sys.executable} -m pip install --no-build-isolation --no-deps"
    root = PACKAGE.parent
    if (root / "setup.py").is_file():
        return f"{pip} -e {root}   (or `make build` in {root})"
    return f"{pip} --force-reinstall <the xent_ext source directory>"


def message(built_version: str, built_cuda: str | None, running_version: str,
            running_cuda: str | None) -> str:
    def describe(version: str, cuda: str | None) -> str:
        return f"torch {version}" + (f" (CUDA {cuda})" if cuda else "")

    return (f"xent_ext was built against {describe(built_version, built_cuda)}, but "
            f"{describe(running_version, running_cuda)} is running; the compiled extension "
            "loads only under the torch it was built with. Rebuild it against this torch:\n"
            f"    {rebuild_command()}\n"
            f"or install torch {release(built_version)} again.")


def check() -> None:
    """Raises ImportError when the running torch is not the one xent_ext/_C was built with.
    Does nothing when no build record exists (a build by an older setup.py)."""
    try:
        from . import _build_info
    except ImportError:
        return
    import torch

    built_cuda = getattr(_build_info, "TORCH_CUDA", None)
    if mismatch(_build_info.TORCH_VERSION, built_cuda, torch.__version__, torch.version.cuda):
        raise ImportError(message(_build_info.TORCH_VERSION, built_cuda, torch.__version__,
                                  torch.version.cuda))
