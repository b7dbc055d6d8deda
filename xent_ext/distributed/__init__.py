"""Cross entropy over logits whose classes are split across the ranks of a process group
(tensor-parallel language-model heads).

    loss = xent_ext.distributed.vocab_parallel_cross_entropy(local_logits, target, group=tp)
    loss = xent_ext.distributed.vocab_parallel_linear_cross_entropy(hidden, local_head, target)

DTensor logits sharded on the class dimension go through xent_ext.cross_entropy directly.
"""

import torch

if not torch.distributed.is_available():
    raise ImportError("xent_ext.distributed needs a torch built with torch.distributed")

from ._collectives import clear_layout_cache
from ._linear import vocab_parallel_linear_cross_entropy
from ._vocab import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "clear_layout_cache"]
