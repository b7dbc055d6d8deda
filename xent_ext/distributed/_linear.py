"""vocab_parallel_linear_cross_entropy: a language-model head whose weight is sharded by
vocabulary, fused with the vocab-parallel cross entropy, on linear_cross_entropy's class-slab
passes (xent_ext/_class_slabs.py) over this rank's shard of the weight.

Forward: the statistics pass over the local weight (each tile of logits made by one GEMM and
reduced at once to the slice's statistics), then the two all-reduces of the vocab-parallel
loss.  Nothing of size N x V_local is kept: the backward runs the gradient pass (each tile's
logits recomputed and turned into their gradient in place, consumed at once by d weight of
its slab, d bias, and d input, partial: this rank's classes); ONE all-reduce SUM of d input
over the group ends it.  Peak extra memory: one tile of logits (chunk_bytes), d input in
float32 and the O(N) rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _class_slabs, _linear_plan
from ..functional import _check_options
from . import _collectives
from ._vocab import (
    check_autograd_mode,
    check_target,
    loss_and_coef,
    make_config,
    outputs,
    rows_from_stats,
    scaled_coef,
)


def _tiles(n: int, v: int, x: Tensor, chunk_size: int | None,
           chunk_bytes: int | None) -> _linear_plan.Plan:
    """chunk_size: rows per piece, every local class in one slab (the rows of a chunk);
    else slabs and pieces within the budget (linear_cross_entropy's default when None)."""
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError("vocab_parallel_linear_cross_entropy: pass chunk_size or "
                         "chunk_bytes, not both")
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return _linear_plan.Plan(rows=chunk_size, slab=max(v, 1))
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    budget = _linear_plan.default_budget(x.device, x.dtype) if chunk_bytes is None else chunk_bytes
    return _linear_plan.slab_tiles(n, v, x.dtype.itemsize, budget)


class _LinearVocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, t, cw, cfg, tiles):
        st = _class_slabs.stats(x, w, b, t, cw, cfg.vocab_start, cfg.ignore_index,
                                cfg.label_smoothing, cfg.logit_scale, cfg.softcap, tiles)
        rows = rows_from_stats(st, t, w.shape[0], cfg, cw is not None)
        loss, coef, zrows = loss_and_coef(rows, cfg)
        ctx.cfg, ctx.tiles, ctx.has_bias, ctx.has_cw = cfg, tiles, b is not None, cw is not None
        empty = coef.new_empty(0)
        ctx.save_for_backward(x, w, b if b is not None else empty, t,
                              cw if cw is not None else empty, coef)
        ctx.mark_non_differentiable(rows.lse)
        if zrows is not None:
            ctx.mark_non_differentiable(zrows)
        return loss.to(x.dtype), rows.lse, zrows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_z):
        if grad_loss is None:
            return (None,) * 7
        x, w, b, t, cw, coef = ctx.saved_tensors
        b = b if ctx.has_bias else None
        cw = cw if ctx.has_cw else None
        cfg = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _class_slabs.grads(x, w, b, t, cw, cfg.vocab_start,
                                        scaled_coef(coef, grad_loss), cfg.logit_scale,
                                        cfg.softcap, ctx.tiles, need_x, need_w, need_b)
        if dx is not None:
            # d input is the sum of every rank's part (each saw its own classes): the one
            # collective of the backward.
            dx = _collectives.all_reduce(dx, "sum", cfg.group).to(x.dtype)
        return (dx, dw, db.to(b.dtype) if db is not None else None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    group=None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """vocab_parallel_cross_entropy(input @ local_weight.T + bias, target, ...) without the
    N x V_local logits: input (..., H), the same on every rank; local_weight (V_local, H), this
    rank's rows of the head (classes [vocab_start, vocab_start + V_local)); bias (V_local,)
    optional.  The logits are made a tile at a time, as linear_cross_entropy's class slabs:
    chunk_bytes bounds a tile (default: linear_cross_entropy's budget for the device), or
    chunk_size gives rows per tile, every local class at once.  Options and results as
    vocab_parallel_cross_entropy (weight: the class weights, full or local).  Gradients:
    input (all-reduced over the group), local_weight and bias (local)."""
    if input.dim() < 1 or local_weight.dim() != 2 or input.shape[-1] != local_weight.shape[1]:
        raise RuntimeError(f"vocab_parallel_linear_cross_entropy: input (..., H) and "
                           f"local_weight (V_local, H) expected, got {list(input.shape)} and "
                           f"{list(local_weight.shape)}")
    if local_weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise RuntimeError("vocab_parallel_linear_cross_entropy: input, local_weight and bias "
                           "must have the same dtype")
    if bias is not None and tuple(bias.shape) != (local_weight.shape[0],):
        raise RuntimeError(f"vocab_parallel_linear_cross_entropy: bias must be "
                           f"({local_weight.shape[0]},), got {list(bias.shape)}")
    red = _check_options(input, target, None, reduction, label_smoothing, z_loss, softcap,
                         logit_scale)
    row_shape = tuple(input.shape[:-1])
    check_autograd_mode("vocab_parallel_linear_cross_entropy", input, local_weight, bias, weight)
    check_target(input, target, row_shape)
    v = local_weight.shape[0]
    cfg, cw = make_config(input, v, group, vocab_start, None, weight, red, ignore_index,
                          label_smoothing, logit_scale, softcap, z_loss, None)
    x2 = input.reshape(math.prod(row_shape), input.shape[-1])
    t = target.reshape(-1).long()
    tiles = _tiles(x2.shape[0], v, x2, chunk_size, chunk_bytes)
    loss, lse, zterm = _LinearVocabCE.apply(x2, local_weight, bias, t, cw, cfg, tiles)
    return outputs(loss, lse, zterm, red, row_shape, return_z_loss, return_lse, input.dtype)
