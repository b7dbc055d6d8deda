"""xent_ext: fused cross-entropy for PyTorch (log-softmax + NLL, loss and gradient in one pass).

    import xent_ext
    loss = xent_ext.cross_entropy(logits, target)     # same signature as F.cross_entropy
    criterion = xent_ext.CrossEntropyLoss()            # same constructor as nn.CrossEntropyLoss
    with xent_ext.patch():                             # route F.cross_entropy to xent_ext
        ...

`python -m xent_ext` prints what is in use (versions, CUDA, CPU instruction set, threads).
"""

from . import _torch_check

# Before anything loads the compiled _C: under another torch it would fail obscurely.
_torch_check.check()

from . import _ops, reference  # noqa: E402
from ._C import cpu_isa, empty_cpu_cache, set_cpu_isa  # noqa: E402
from ._capabilities import about, cuda_available, has_cuda  # noqa: E402
from ._version import __version__  # noqa: E402
from .functional import cross_entropy  # noqa: E402
from .modules import CrossEntropyLoss  # noqa: E402
from .patching import is_patched, patch, unpatch  # noqa: E402

__all__ = ["cross_entropy", "CrossEntropyLoss", "patch", "unpatch", "is_patched", "reference",
           "cpu_isa", "set_cpu_isa", "has_cuda", "cuda_available", "about", "empty_cpu_cache",
           "_ops", "__version__"]
