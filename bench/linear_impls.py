"""The implementations of a language-model head's loss compared by `--modes linear`.

Each factory takes the device and returns `fn(x (N, H), weight (V, H), target (N,)) -> mean
loss`, or raises Unavailable with the reason it cannot run here.  Every one computes
F.cross_entropy(x @ weight.T, target) and its gradients for x and weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .impls import Unavailable

LinearFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _xent_chunks(chunk_bytes: int | None) -> Callable[[str], LinearFn]:
    def make(device: str) -> LinearFn:
        try:
            import xent_ext
        except ImportError as e:
            raise Unavailable(f"xent_ext not importable ({e}); build it first") from e
        if device == "cuda" and not xent_ext.has_cuda():
            raise Unavailable("xent_ext was built without CUDA")
        return lambda x, w, t: xent_ext.linear_cross_entropy(x, w, t, chunk_bytes=chunk_bytes)

    return make


def _naive_loss(x: Tensor, w: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(x @ w.t(), t)


def _naive(device: str) -> LinearFn:
    return _naive_loss


def _compile(device: str) -> LinearFn:
    torch._dynamo.reset()  # static kernels for this shape, and no recompile limit reached
    return torch.compile(_naive_loss, dynamic=False)


def _torch_lce(chunked: bool) -> Callable[[str], LinearFn]:
    def make(device: str) -> LinearFn:
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        if not chunked:
            return lambda x, w, t: F.linear_cross_entropy(x, w, t)
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)

    return make


def _liger(device: str) -> LinearFn:
    if device != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Unavailable(f"liger_kernel not importable ({e})") from e
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _cce(device: str) -> LinearFn:
    if device != "cuda":
        raise Unavailable("cut_cross_entropy runs on CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut_cross_entropy not importable ({e})") from e
    return lambda x, w, t: linear_cross_entropy(x, w, t)


LINEAR_IMPLS: dict[str, Callable[[str], LinearFn]] = {
    # The default budget (xent_ext/_linear_plan.py: 8 MiB of logits on the CPU, where the
    # language-model shapes take the class slabs; 256 MiB on CUDA).
    "xent_ext": _xent_chunks(None),
    # A large budget: rows chunks of 256 MiB (three GEMMs, as naive), more memory.
    "xent_ext (256 MiB)": _xent_chunks(256 << 20),
    "naive": _naive,
    "compile": _compile,
    "torch": _torch_lce(chunked=False),
    "torch (chunked)": _torch_lce(chunked=True),
    "liger": _liger,
    "cce": _cce,
}
NAIVE = "naive"
