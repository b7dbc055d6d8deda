"""vocab_parallel_linear_cross_entropy: a language-model head whose weight is sharded by
vocabulary, fused with the vocab-parallel cross entropy, chunked over rows.

Forward: for each chunk of rows, the chunk's local logits (one mm), reduced at once to the
slice's statistics (vocab_stats) and dropped; then the two all-reduces of the vocab-parallel
loss over all rows.  Nothing of size N x V_local is kept: the backward recomputes each chunk's
logits, turns them into their gradient in place (vocab_grad_), and accumulates d input
(partial: this rank's classes) and d weight; ONE all-reduce SUM of d input over the group ends
it.  Peak extra memory: one chunk of logits, plus d input in float32 and, for half-precision
weights over more than one chunk, d weight in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _linear_chunks, _vocab_ops
from ..functional import _check_options
from . import _collectives
from ._vocab import check_target, loss_and_coef, make_config, outputs, rows_from_stats, scaled_coef

# Rows per chunk by default: the chunk's logits stay near 64 MiB in float32.
_CHUNK_BYTES = 64 << 20


def _chunk_rows(n: int, v: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, min(n, _CHUNK_BYTES // max(4 * v, 1)))


def _logits(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


class _LinearVocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, t, cw, cfg, chunk):
        n = x.shape[0]
        stats = [
            _vocab_ops.stats(_logits(x[i:i + chunk], w, b), t[i:i + chunk], cw,
                             cfg.vocab_start, cfg.ignore_index, cfg.label_smoothing,
                             cfg.logit_scale, cfg.softcap)
            for i in range(0, n, chunk)]
        st = torch.cat(stats) if stats else x.new_zeros((0, _vocab_ops.STATS_COLS),
                                                        dtype=torch.float32)
        rows = rows_from_stats(st, t, w.shape[0], cfg, cw is not None)
        loss, coef, zrows = loss_and_coef(rows, cfg)
        ctx.cfg, ctx.chunk, ctx.has_bias, ctx.has_cw = cfg, chunk, b is not None, cw is not None
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
        cfg, chunk = ctx.cfg, ctx.chunk
        coef = scaled_coef(coef, grad_loss)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        # d weight accumulated as linear_cross_entropy's is: by GEMMs into one float32 buffer
        # (no per-chunk temporary of the weight's size), or one GEMM when there is one chunk.
        dw = (_linear_chunks._WeightGradAccumulator(w, chunk, x.shape[0] <= chunk)
              if need_w else None)
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None
        for i in range(0, x.shape[0], chunk):
            xc = x[i:i + chunk]
            g = _logits(xc, w, b)
            _vocab_ops.grad_(g, t[i:i + chunk], cw, cfg.vocab_start, coef[i:i + chunk],
                             cfg.logit_scale, cfg.softcap)
            if dx is not None:
                dx[i:i + chunk] = g @ w
            if dw is not None:
                dw.add(g, xc)
            if db is not None:
                db += g.sum(0, dtype=acc)
        if dx is not None:
            # d input is the sum of every rank's part (each saw its own classes): the one
            # collective of the backward.
            dx = _collectives.all_reduce(dx, "sum", cfg.group).to(x.dtype)
        return (dx, dw.result().to(w.dtype) if dw is not None else None,
                db.to(b.dtype) if db is not None else None, None, None, None, None)


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
) -> Tensor | tuple[Tensor, ...]:
    """vocab_parallel_cross_entropy(input @ local_weight.T + bias, target, ...) without the
    N x V_local logits: input (..., H), the same on every rank; local_weight (V_local, H), this
    rank's rows of the head (classes [vocab_start, vocab_start + V_local)); bias (V_local,)
    optional.  chunk_size: rows per chunk (default: about 64 MiB of float32 logits).  Options
    and results as vocab_parallel_cross_entropy (weight: the class weights, full or local).
    Gradients: input (all-reduced over the group), local_weight and bias (local)."""
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
    check_target(input, target, row_shape)
    v = local_weight.shape[0]
    cfg, cw = make_config(input, v, group, vocab_start, None, weight, red, ignore_index,
                          label_smoothing, logit_scale, softcap, z_loss, None)
    x2 = input.reshape(math.prod(row_shape), input.shape[-1])
    t = target.reshape(-1).long()
    chunk = _chunk_rows(x2.shape[0], v, chunk_size)
    loss, lse, zterm = _LinearVocabCE.apply(x2, local_weight, bias, t, cw, cfg, chunk)
    return outputs(loss, lse, zterm, red, row_shape, return_z_loss, return_lse, input.dtype)
