"""xent_ext.patch(): every cross entropy computed through PyTorch runs xent_ext while in force.

Two layers, both installed by the first patch and removed by the last:
- torch.nn.functional.cross_entropy (and the `F` that nn.CrossEntropyLoss.forward reads at call
  time) is swapped for a function that calls xent_ext directly: the common path, no dispatcher
  round trip;
- a kernel of ours is registered for aten::cross_entropy_loss (_aten_override.py), so callers
  that bypass the Python attribute reach xent_ext too: a `cross_entropy` imported from
  torch.nn.functional before the patch, torch._C._nn.cross_entropy_loss, TorchScript and C++.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
import torch.nn.functional as F
from torch.nn.modules import loss as _loss_module

from . import _aten_override
from . import functional as _functional
from .functional import cross_entropy

_ORIGINAL = F.cross_entropy

# xent_ext.cross_entropy's keyword-only options that a patched call may take.  The return_*
# flags change what the call returns, which callers written for F.cross_entropy cannot expect.
_OPTIONS = frozenset(p.name for p in inspect.signature(cross_entropy).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY) - {"return_z_loss",
                                                                      "return_lse"}

_lock = threading.Lock()
_entries: list[tuple[object, dict]] = []  # the patches in force, oldest first
_options: dict = {}  # the newest patch's options: read without the lock on every call
_library = None  # the aten::cross_entropy_loss registration while any patch is in force


def _current_options() -> dict:
    return _options


@functools.wraps(_ORIGINAL)
def _patched_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                           reduce=None, reduction="mean", label_smoothing=0.0):
    if (torch.overrides.has_torch_function_variadic(input, target, weight)
            or not _aten_override.runs_here(input)):
        # Tensor subclasses and __torch_function__ modes: torch's own Python entry handles the
        # protocol, then reaches aten::cross_entropy_loss, which is ours while patched.  So do
        # devices xent_ext has no kernels for: the operator's kernel decides (torch's, or an
        # error when options are set).
        return _ORIGINAL(input, target, weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)
    return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing, **_options)


def _check_options(options: dict) -> None:
    for name in options:
        if name in ("return_z_loss", "return_lse"):
            raise TypeError(f"patch() does not take {name!r}: it changes what cross_entropy "
                            "returns, which callers of F.cross_entropy do not expect; call "
                            "xent_ext.cross_entropy(..., {name}=True) where you need it")
        if name not in _OPTIONS:
            raise TypeError(f"patch() got an unexpected keyword argument {name!r} (options: "
                            f"{', '.join(sorted(_OPTIONS))})")
    if options:
        # The values checked once here, with the error each call would give.
        with torch.no_grad():
            _functional.cross_entropy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                                      **options)


class patch:
    """While in force, F.cross_entropy, nn.CrossEntropyLoss, torch._C._nn.cross_entropy_loss and
    aten::cross_entropy_loss (TorchScript, C++) run xent_ext, also where `cross_entropy` was
    imported before the patch.

    patch(**options) applies xent_ext's keyword-only options (z_loss, softcap, logit_scale,
    inplace_backward) to every patched call; an unknown name raises TypeError.  A call xent_ext
    cannot run (another device) goes to torch's own kernel, unless options are set: then it
    raises, since torch's kernel cannot apply them.

    Use as a context manager (the originals come back on exit, also on an exception):
        with xent_ext.patch(z_loss=1e-4):
            loss = model_loss(...)
    or call xent_ext.patch() once; xent_ext.unpatch() ends the newest patch.  Patches nest and
    may be entered from several threads (a lock guards the list of patches in force): the newest
    patch's options apply, and torch's own cross_entropy is back when the last one ends.
    """

    def __init__(self, **options) -> None:
        _check_options(options)
        self._token = object()
        _acquire(self._token, dict(options))

    def __enter__(self) -> patch:
        return self

    def __exit__(self, *exc) -> None:
        _release(self._token)


def _acquire(token: object, options: dict) -> None:
    global _options, _library
    with _lock:
        _entries.append((token, options))
        _options = options
        if _library is None:
            _library = _aten_override.register(_aten_override.make_kernel(_current_options))
        F.cross_entropy = _patched_cross_entropy
        _loss_module.F.cross_entropy = _patched_cross_entropy


def _release(token: object | None) -> None:
    """Ends the patch of this token (None: the newest); nothing if it has already ended."""
    global _options, _library
    with _lock:
        index = next((i for i in range(len(_entries) - 1, -1, -1)
                      if token is None or _entries[i][0] is token), None)
        if index is None:
            return
        del _entries[index]
        if _entries:
            _options = _entries[-1][1]
            return
        _options = {}
        F.cross_entropy = _ORIGINAL
        _loss_module.F.cross_entropy = _ORIGINAL
        if _library is not None:
            _library._destroy()
            _library = None


def unpatch() -> None:
    """Ends the newest patch(); torch's own cross_entropy is back when none is left in force."""
    _release(None)


def is_patched() -> bool:
    return F.cross_entropy is _patched_cross_entropy
