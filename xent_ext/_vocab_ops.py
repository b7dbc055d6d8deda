"""Operators of the vocab-parallel cross entropy: one shard of a row's classes at a time.

A row's classes are split into slices (one per rank); each slice is reduced to partial
statistics, the partials are combined (by the caller, across ranks), and each slice's gradient
is computed given the row's global normaliser.  The math is that of csrc/xent_row.h (MaxSum,
DotAcc, GradCoef): every sum is taken relative to a max, so rows at 1e30 are as accurate as
rows near 0.

  vocab_stats(logits (N, V), target (N,), weight (V,)?, vocab_start, ignore_index,
              label_smoothing, logit_scale, softcap) -> (N, 7) float32 (float64 for float64)
      per row, for the local slice [vocab_start, vocab_start + V) of the classes:
      0 max     the slice's reference: the max of y = T(x), or at most 64 below it (the CPU
                kernels' row sweep); -inf for an all -inf slice; a NaN logit makes it NaN or
                leaves it finite, and then always makes the sum NaN
      1 sum     sum_j exp(y_j - max)   (against 0 when max is -inf: 0)
      2 y_t     y of the target when the target is local, else 0
      3 w_t     weight of the target (1 without weights) when local and not ignored, else 0
      4 hit     1 when the target is local and not ignored, else 0
      5 dot     sum_j w_j (y_j - max) (against 0 when max is -inf); 0 without smoothing
      6 mass    sum_j w_j (V without weights); 0 without smoothing
  vocab_grad(logits, target, weight?, vocab_start, coef (N, 4), logit_scale, softcap)
      -> gradient (N, V) in the logits' dtype, coef = [ref, a, b, hot] per row (GradCoef):
      dx_j = (a exp(y_j - ref) - b w_j - hot [j == target - vocab_start]) T'(x_j)
  vocab_grad_(logits!, ...) -> (): the same, written over the logits.

Schemas live in csrc/ops.cpp with the fused CPU kernels (csrc/cpu/xent_cpu_vocab.cpp); the
implementations here, in ATen operations, serve every other device (CUDA) and back the CPU when
the extension was built without them.  Fake kernels let torch.compile trace the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that defines the operators)
from ._composite import transformed

STATS_COLS = 7
_MAX, _SUM, _YT, _WT, _HIT, _DOT, _MASS = range(STATS_COLS)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.xent_ext, name)


_lib = torch.library.Library("xent_ext", "FRAGMENT")
if not _has_op("vocab_stats"):  # a build whose ops.cpp predates these operators
    _lib.define("vocab_stats(Tensor logits, Tensor target, Tensor? weight, int vocab_start, "
                "int ignore_index, float label_smoothing, float logit_scale, float softcap) "
                "-> Tensor")
    _lib.define("vocab_grad(Tensor logits, Tensor target, Tensor? weight, int vocab_start, "
                "Tensor coef, float logit_scale, float softcap) -> Tensor")
    _lib.define("vocab_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, "
                "int vocab_start, Tensor coef, float logit_scale, float softcap) -> ()")


def _local_target(target: Tensor, v: int, vocab_start: int, ignore_index: int):
    """(index into the slice, clamped to it; True where the target is local and not ignored)."""
    t = target - vocab_start
    hit = (target != ignore_index) & (t >= 0) & (t < v)
    return torch.where(hit, t, torch.zeros_like(t)), hit


def stats_aten(logits: Tensor, target: Tensor, weight: Tensor | None, vocab_start: int,
               ignore_index: int, label_smoothing: float, logit_scale: float,
               softcap: float) -> Tensor:
    acc = _acc(logits.dtype)
    n, v = logits.shape
    y = transformed(logits.to(acc), logit_scale, softcap)
    out = y.new_zeros((n, STATS_COLS))
    if v == 0:
        out[:, _MAX] = -torch.inf
        return out
    m = y.amax(1)  # NaN propagates
    ref = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    rel = y - ref.unsqueeze(1)
    out[:, _MAX] = m
    out[:, _SUM] = rel.exp().sum(1)
    idx, hit = _local_target(target.long(), v, vocab_start, ignore_index)
    zero = torch.zeros_like(m)
    out[:, _YT] = torch.where(hit, y.gather(1, idx.unsqueeze(1)).squeeze(1), zero)
    w_t = weight.to(acc)[idx] if weight is not None else torch.ones_like(m)
    out[:, _WT] = torch.where(hit, w_t, zero)
    out[:, _HIT] = hit.to(acc)
    if label_smoothing > 0:
        if weight is None:
            out[:, _DOT] = rel.sum(1)
            out[:, _MASS] = float(v)
        else:
            w = weight.to(acc)
            out[:, _DOT] = (rel * w).sum(1)
            out[:, _MASS] = w.sum()
    return out


def grad_aten(logits: Tensor, target: Tensor, weight: Tensor | None, vocab_start: int,
              coef: Tensor, logit_scale: float, softcap: float) -> Tensor:
    acc = _acc(logits.dtype)
    n, v = logits.shape
    if v == 0:  # a rank holding no classes
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    x = logits.to(acc)
    y = transformed(x, logit_scale, softcap)
    ref, a, b, hot = (coef[:, i].to(acc).unsqueeze(1) for i in range(4))
    g = a * (y - ref).exp()
    g = g - (b * weight.to(acc) if weight is not None else b)
    idx, hit = _local_target(target.long(), v, vocab_start, torch.iinfo(torch.int64).min)
    onehot = torch.zeros_like(g).scatter_(1, idx.unsqueeze(1), hit.to(acc).unsqueeze(1))
    g = g - hot * onehot
    if softcap > 0:
        th = torch.tanh(x * logit_scale / softcap)
        slope = torch.where(x == -torch.inf, torch.zeros_like(th), logit_scale * (1 - th * th))
        g = g * slope
    elif logit_scale != 1.0:
        g = g * logit_scale
    return g.to(logits.dtype)


def _grad_inplace_aten(logits, target, weight, vocab_start, coef, logit_scale, softcap):
    logits.copy_(grad_aten(logits, target, weight, vocab_start, coef, logit_scale, softcap))


# CompositeExplicitAutograd: used for every device without a kernel of its own (CUDA, and the
# CPU of a build without csrc/cpu/xent_cpu_vocab.cpp).
_lib.impl("vocab_stats", stats_aten, "CompositeExplicitAutograd")
_lib.impl("vocab_grad", grad_aten, "CompositeExplicitAutograd")
_lib.impl("vocab_grad_", _grad_inplace_aten, "CompositeExplicitAutograd")


@torch.library.register_fake("xent_ext::vocab_stats")
def _stats_fake(logits, target, weight, vocab_start, ignore_index, label_smoothing,
                logit_scale, softcap):
    return logits.new_empty((logits.shape[0], STATS_COLS), dtype=_acc(logits.dtype))


@torch.library.register_fake("xent_ext::vocab_grad")
def _grad_fake(logits, target, weight, vocab_start, coef, logit_scale, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("xent_ext::vocab_grad_")
def _grad_inplace_fake(logits, target, weight, vocab_start, coef, logit_scale, softcap):
    return None


stats = torch.ops.xent_ext.vocab_stats
grad = torch.ops.xent_ext.vocab_grad
grad_ = torch.ops.xent_ext.vocab_grad_
