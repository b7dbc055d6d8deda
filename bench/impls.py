"""The implementations compared, as a registry of factories.

Every entry maps a row name to an ImplSpec whose `make(device)` returns a loss function
`fn(logits, target) -> scalar mean loss` (same meaning as F.cross_entropy(logits, target)), or
raises Unavailable with the reason it cannot run here (not installed, CUDA only, ...).
`make` is called once per (shape, dtype) group, so an implementation that caches per shape
(torch.compile) starts clean in every group.

To compare one more implementation, add one entry to IMPLS; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

# The rows that the speedup columns divide by.
EAGER = "eager"
COMPILE = "compile"


class Unavailable(Exception):
    """An implementation cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class ImplSpec:
    make: Callable[[str], LossFn]
    # Writes its gradient into the logits buffer (Liger does): the runner regenerates the
    # inputs after such a row so that the next rows see the same data.
    mutates_input: bool = False


def _loss_of(out) -> Tensor:
    """Peers return a tensor, a tuple (loss, extras...) or an object with .loss; keep the
    mean loss, reducing a per-row loss where a peer's default reduction is 'none'."""
    if isinstance(out, tuple | list):
        out = out[0]
    elif not isinstance(out, Tensor) and hasattr(out, "loss"):
        out = out.loss
    return out.mean() if out.dim() > 0 else out


def _xent(device: str) -> LossFn:
    try:
        import xent_ext
    except ImportError as e:  # e.g. not built: the bench still compares the others
        raise Unavailable(f"xent_ext not importable ({e}); build it first") from e
    if device == "cuda" and not xent_ext.has_cuda():
        raise Unavailable("xent_ext was built without CUDA")
    return xent_ext.cross_entropy


def _xent_inplace(device: str) -> LossFn:
    ce = _xent(device)

    def fn(logits: Tensor, target: Tensor) -> Tensor:
        # The bench's logits are a leaf, which inplace_backward refuses to overwrite; a view
        # of it stands for a model's output (the leaf's data is clobbered: mutates_input).
        x = logits.view_as(logits) if logits.requires_grad else logits
        return ce(x, target, inplace_backward=True)

    return fn


def _eager(device: str) -> LossFn:
    return F.cross_entropy


def _naive(device: str) -> LossFn:
    # The textbook composition: materialises softmax and its log (two N*V tensors).
    def naive(x: Tensor, t: Tensor) -> Tensor:
        logp = torch.log(torch.softmax(x, dim=1))
        return -logp.gather(1, t.unsqueeze(1)).mean()

    return naive


def _compile(device: str) -> LossFn:
    # A clean dynamo cache per group: static-shape kernels for this shape/dtype, and no risk of
    # reaching the recompile limit, past which dynamo silently runs eager code instead.
    torch._dynamo.reset()
    return torch.compile(F.cross_entropy, dynamic=False)


def _require_cuda(device: str, what: str) -> None:
    if device != "cuda":
        raise Unavailable(f"{what} runs on CUDA only")


def _rows_only(what: str, fn: LossFn) -> LossFn:
    """Peers that take (N, V) logits only: a K-dim input is a cell they cannot run."""
    def call(x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 2:
            raise Unavailable(f"{what} takes (N, V) logits only")
        return _loss_of(fn(x, t))

    return call


def _liger(device: str) -> LossFn:
    _require_cuda(device, "Liger-Kernel")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except ImportError:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError as e:
            raise Unavailable(f"liger_kernel not importable ({e})") from e
        fn = LigerCrossEntropyLoss()
    return _rows_only("Liger-Kernel", fn)


def _quack(device: str) -> LossFn:
    _require_cuda(device, "quack")
    try:
        from quack.cross_entropy import cross_entropy as fn
    except ImportError as e:
        raise Unavailable(f"quack not importable ({e})") from e
    return _rows_only("quack", fn)


def _cce(device: str) -> LossFn:
    _require_cuda(device, "cut_cross_entropy")
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"cut_cross_entropy not importable ({e})") from e
    # Its API fuses the classifier matmul: linear_cross_entropy(hidden, classifier, target)
    # never takes logits, so there is no like-for-like row on a logits tensor.
    raise Unavailable("cut_cross_entropy takes hidden states and the classifier weight, not "
                      "logits; no logits-only entry point to compare")


IMPLS: dict[str, ImplSpec] = {
    "xent_ext": ImplSpec(_xent),
    # The gradient written over the logits: no N x V buffer besides the logits.
    "xent_ext (inplace)": ImplSpec(_xent_inplace, mutates_input=True),
    EAGER: ImplSpec(_eager),
    "naive": ImplSpec(_naive),
    COMPILE: ImplSpec(_compile),
    "liger": ImplSpec(_liger, mutates_input=True),
    "quack": ImplSpec(_quack),
    "cce": ImplSpec(_cce),
}


def parse_impls(text: str | None) -> list[str]:
    """--impls 'xent_ext,eager' -> names in the registry's order; None -> all of them."""
    if text is None:
        return list(IMPLS)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}: choose from {list(IMPLS)}")
    return [name for name in IMPLS if name in wanted]
