"""xent_ext: fused cross-entropy for PyTorch (log-softmax + NLL, loss and gradient in one pass).

    import xent_ext
    loss = xent_ext.cross_entropy(logits, target)     # same signature as F.cross_entropy
    criterion = xent_ext.CrossEntropyLoss()            # same constructor as nn.CrossEntropyLoss
    with xent_ext.patch():                             # every cross entropy through torch
        ...                                            # runs xent_ext (see patching.py)

`python -m xent_ext` prints what is in use (versions, CUDA, CPU instruction set, threads).
"""

from . import _torch_check

# Before anything loads the compiled _C: under another torch it would fail obscurely. (The
# imports below it are exempt from E402 in pyproject.toml.)
_torch_check.check()

from . import _ops, reference
from ._C import cpu_cache_bytes, cpu_isa, empty_cpu_cache, set_cpu_isa
from ._capabilities import about, cuda_available, has_cuda
from ._version import __version__
from .functional import cross_entropy
from .linear import linear_cross_entropy
from .linear_module import LinearCrossEntropyLoss
from .modules import CrossEntropyLoss
from .patching import is_patched, patch, unpatch

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "patch", "unpatch", "is_patched", "reference",
           "cpu_isa", "set_cpu_isa", "has_cuda", "cuda_available", "about", "empty_cpu_cache",
           "cpu_cache_bytes", "_ops", "__version__", "distributed"]


def __getattr__(name: str):
    # torch.distributed is imported on first use only (and may be absent from a torch build).
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
