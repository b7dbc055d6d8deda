"""The vocab-parallel ops in one process: a row's classes cut into pieces, each piece reduced by
vocab_stats, the pieces combined as the all-reduces would (max, then sum), each piece's
gradient from vocab_grad.  Used to test the ops against F.cross_entropy without a group."""

from __future__ import annotations

import torch

from xent_ext import _vocab_math as vm
from xent_ext import _vocab_ops as vo


def split_cross_entropy(x, t, sizes, weight=None, ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, logit_scale=1.0, softcap=0.0, reduction="mean",
                        grad_loss=None):
    """(loss in the accumulation dtype, gradient in x's dtype, lse) of x (N, C) cut into
    pieces of the given sizes along the classes."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    xs = [x[:, s:s + v].contiguous() for s, v in zip(starts, sizes, strict=True)]
    ws = ([weight[s:s + v] for s, v in zip(starts, sizes, strict=True)] if weight is not None
          else [None] * len(sizes))
    st = [vo.stats(xi, t, wi, s0, ignore_index, label_smoothing, logit_scale, softcap)
          for xi, wi, s0 in zip(xs, ws, starts, strict=True)]
    # The max as an all-reduce MAX that drops NaN would take it (whether a backend's MAX keeps
    # a NaN is not promised): the NaN sum-exp of that piece must carry the NaN to the row.
    maxes = torch.stack([s[:, 0] for s in st])
    gmax = torch.where(maxes.isnan(), -torch.inf, maxes).amax(0)
    weighted = weight is not None
    packed = sum(vm.pack(s, gmax, xi.shape[1], label_smoothing, weighted)
                 for s, xi in zip(st, xs, strict=True))
    r = vm.combine(packed, gmax, t != ignore_index, label_smoothing, weighted)
    rows = vm.row_loss(r, label_smoothing, z_loss)
    if reduction == "mean":
        d = vm.divisor(r)
        loss, s = rows.sum() / d, 1.0 / d
    elif reduction == "sum":
        loss, s = rows.sum(), rows.new_ones(())
    else:
        loss, s = rows, rows.new_ones(())
    if grad_loss is not None:
        s = s * grad_loss.to(s.dtype)
    coef = vm.grad_coef(r, s, label_smoothing, z_loss)
    g = torch.cat([vo.grad(xi, t, wi, s0, coef, logit_scale, softcap)
                   for xi, wi, s0 in zip(xs, ws, starts, strict=True)], 1)
    return loss, g, r.lse
