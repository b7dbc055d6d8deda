"""xent_ext: fused cross-entropy for PyTorch (log-softmax + NLL, loss and gradient in one pass).

    import xent_ext
    loss = xent_ext.cross_entropy(logits, target)     # same signature as F.cross_entropy
    criterion = xent_ext.CrossEntropyLoss()            # same constructor as nn.CrossEntropyLoss
    with xent_ext.patch():                             # route F.cross_entropy to xent_ext
        ...
"""

from . import _ops, reference
from ._C import cpu_isa, empty_cpu_cache, has_cuda, set_cpu_isa
from .functional import cross_entropy
from .modules import CrossEntropyLoss
from .patching import is_patched, patch, unpatch

__all__ = ["cross_entropy", "CrossEntropyLoss", "patch", "unpatch", "is_patched", "reference",
           "cpu_isa", "set_cpu_isa", "has_cuda", "empty_cpu_cache", "_ops"]
__version__ = "0.1.0"
