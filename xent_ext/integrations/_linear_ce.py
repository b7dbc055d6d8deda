"""The fused linear + cross-entropy the integrations call.

xent_ext.linear_cross_entropy(input, weight, target, bias=None, *, ignore_index, reduction,
label_smoothing, softcap, ...) computes the loss of `input @ weight.T + bias` without keeping
the logits.  Where this build does not have it yet, the same call runs as xent_ext.cross_entropy
on F.linear's logits: the same loss and gradients, with the logits materialised.
"""

from __future__ import annotations

import torch.nn.functional as F

import xent_ext


def linear_cross_entropy(input, weight, target, bias=None, **options):
    fused = getattr(xent_ext, "linear_cross_entropy", None)
    if fused is not None:
        return fused(input, weight, target, bias, **options)
    return xent_ext.cross_entropy(F.linear(input, weight, bias), target, **options)


def is_fused() -> bool:
    """True when the logits are never materialised (xent_ext.linear_cross_entropy exists)."""
    return hasattr(xent_ext, "linear_cross_entropy")
