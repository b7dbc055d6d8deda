"""What this build of xent_ext holds and what it can use on this machine (`python -m xent_ext`
prints it)."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import _C
from ._version import __version__


def has_cuda() -> bool:
    """True when the CUDA kernels are compiled into this build (it found a CUDA build of torch
    and a CUDA toolkit). It says nothing about a GPU: a CUDA build on a machine without one
    returns True. See cuda_available() for whether they can run here."""
    return bool(_C.has_cuda())


def cuda_available() -> bool:
    """True when the CUDA kernels are compiled in and torch sees a usable CUDA device."""
    return has_cuda() and torch.cuda.is_available()


def _build_record() -> dict:
    try:
        from . import _build_info as b
    except ImportError:  # built by an older setup.py, which kept no record
        return {}
    return {"torch": b.TORCH_VERSION, "cuda": getattr(b, "TORCH_CUDA", None),
            "archs": getattr(b, "CUDA_ARCHS", "")}


def about() -> dict:
    """Versions, build and run-time facts, as plain values (see __main__.py for the text)."""
    built = _build_record()
    if not has_cuda():
        device = "no: this build has no CUDA kernels"
    elif torch.version.cuda is None:
        device = "no: torch is a CPU-only build"
    elif not torch.cuda.is_available():
        device = "no: torch sees no CUDA device"
    else:
        device = f"yes: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return {
        "xent_ext": __version__,
        "location": os.path.dirname(os.path.abspath(__file__)),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch built against": built.get("torch", "unknown (no build record)"),
        "torch running": torch.__version__ + (f", CUDA {torch.version.cuda}"
                                              if torch.version.cuda else ", CPU-only build"),
        "CUDA kernels compiled in": (f"yes, CUDA {built.get('cuda')}, architectures "
                                     f"{built.get('archs') or 'unknown'}"
                                     if has_cuda() else "no"),
        "CUDA device usable": device,
        "CPU instruction set": _C.cpu_isa() + (f" (XENT_CPU_ISA={os.environ['XENT_CPU_ISA']})"
                                               if os.environ.get("XENT_CPU_ISA") else ""),
        "CPU threads": f"{torch.get_num_threads()} (torch.get_num_threads())",
    }
