"""xent_ext.patch(): route F.cross_entropy (and so nn.CrossEntropyLoss) to xent_ext."""

from __future__ import annotations

import functools
import threading

import torch.nn.functional as F
from torch.nn.modules import loss as _loss_module

from .functional import cross_entropy

_ORIGINAL = F.cross_entropy


@functools.wraps(_ORIGINAL)
def _patched_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                           reduce=None, reduction="mean", label_smoothing=0.0):
    return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)


class patch:
    """Swaps torch.nn.functional.cross_entropy for xent_ext.cross_entropy.

    nn.CrossEntropyLoss.forward looks F.cross_entropy up at call time through its own module's
    `F`, so existing modules are covered too.  Every input F.cross_entropy accepts is handled
    by xent_ext (full parity), so nothing needs to fall back.

    Use as a context manager (the originals come back on exit, also on an exception):
        with xent_ext.patch():
            loss = model_loss(...)
    or call xent_ext.patch() once; xent_ext.unpatch() restores the originals.  Patches nest: a
    count of the patches in force (thread-safe) decides, so an inner `with patch():` leaves the
    outer one in force when it exits.
    """

    def __init__(self) -> None:
        _acquire()

    def __enter__(self) -> patch:
        return self

    def __exit__(self, *exc) -> None:
        unpatch()


_lock = threading.Lock()
_depth = 0


def _acquire() -> None:
    global _depth
    with _lock:
        _depth += 1
        F.cross_entropy = _patched_cross_entropy
        _loss_module.F.cross_entropy = _patched_cross_entropy


def unpatch() -> None:
    """Ends one patch(); torch's own cross_entropy is back when none is left in force."""
    global _depth
    with _lock:
        _depth = max(_depth - 1, 0)
        if _depth == 0:
            F.cross_entropy = _ORIGINAL
            _loss_module.F.cross_entropy = _ORIGINAL


def is_patched() -> bool:
    return F.cross_entropy is _patched_cross_entropy
