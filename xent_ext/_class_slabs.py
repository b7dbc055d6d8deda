"""The class-slab strategy of the fused linear + cross-entropy (_linear_plan.py): the logits
of all rows for a slab of classes at a time, in two passes, each tile produced by one GEMM
into one reused buffer.

stats(): each tile's logits reduced at once to the slice statistics of the vocab operators
  (_vocab_ops.stats) and merged over the slabs of a row (_vocab_math.merge): (N, 7), the
  statistics of one slice holding every class of w.
grads(): given each row's gradient coefficients (_vocab_math.grad_coef, the reduction's
  scale folded in), each tile's logits recomputed and turned in place into their gradient
  (_vocab_ops.grad_), then consumed: d weight of the slab (one GEMM over the slab's rows,
  complete, so rounded to the weight dtype once; a float32 accumulator of slab x H only when
  the rows come in pieces), d bias of the slab, and d input accumulated over the slabs in
  float32 (float64 for float64).
run(): the single-process loss and gradients from the two passes.

The vocab-parallel linear cross entropy runs the same passes on each rank's shard, with its
collectives between them (distributed/_linear.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _linear_chunks, _ops, _vocab_math, _vocab_ops
from ._linear_plan import Plan


def _spans(total: int, step: int):
    for s in range(0, total, step):
        yield s, min(total, s + step)


def _tile(flat: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ w.T + b written into the front of the flat buffer (a contiguous view)."""
    out = flat[:x.shape[0] * w.shape[0]].view(x.shape[0], w.shape[0])
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)
    return out


def _part(t: Tensor | None, s: int, e: int) -> Tensor | None:
    return t[s:e] if t is not None else None


def _buffer(x: Tensor, n: int, v: int, tiles: Plan) -> Tensor:
    return x.new_empty((min(tiles.rows, n) * min(tiles.slab, v),))


def stats(x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, cw: Tensor | None,
          vocab_start: int, ignore_index: int, label_smoothing: float, logit_scale: float,
          softcap: float, tiles: Plan, flat: Tensor | None = None) -> Tensor:
    """The statistics (N, 7) of the classes [vocab_start, vocab_start + V) of w (V, H) for
    the rows of x (N, H); cw: the class weights of those V classes.  flat: the tile buffer
    to use (it ends holding the last tile's logits: see grads' `ready`)."""
    n, v = x.shape[0], w.shape[0]
    opts = (ignore_index, label_smoothing, logit_scale, softcap)
    if n == 0 or v == 0:
        return _vocab_ops.stats(x.new_empty((n, v)), t, cw, vocab_start, *opts)
    flat = _buffer(x, n, v, tiles) if flat is None else flat
    pieces = []
    for r0, r1 in _spans(n, tiles.rows):
        st = None
        for s0, s1 in _spans(v, tiles.slab):
            z = _tile(flat, x[r0:r1], w[s0:s1], _part(b, s0, s1))
            part = _vocab_ops.stats(z, t[r0:r1], _part(cw, s0, s1), vocab_start + s0, *opts)
            st = part if st is None else _vocab_math.merge(st, part, label_smoothing)
        pieces.append(st)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _add_product(acc: Tensor, g: Tensor, w: Tensor, tmp: Tensor | None) -> None:
    """acc (float32/float64) += g @ w: by the GEMM itself (beta = 1) where it can write the
    accumulation dtype from g's (float32 and float64; cuBLAS from half), else (half on the
    CPU) through a half temporary that the GEMM fills (float32 inside) and an add."""
    if g.dtype == acc.dtype:
        acc.addmm_(g, w)
    elif tmp is None:
        torch.addmm(acc, g, w, out_dtype=acc.dtype, out=acc)
    else:
        part = tmp[:g.shape[0]]
        torch.mm(g, w, out=part)
        acc.add_(part)


def grads(x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, cw: Tensor | None,
          vocab_start: int, coef: Tensor, logit_scale: float, softcap: float, tiles: Plan,
          need_x: bool, need_w: bool, need_b: bool, flat: Tensor | None = None,
          ready: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(d input in the accumulation dtype, d weight in the weight's dtype, d bias in the
    accumulation dtype) of the loss whose per-row gradient coefficients are coef (N, 4);
    None for those not asked for.

    The slabs are taken last first, so that with `ready` (flat still holds the logits of the
    last slab, all rows in one piece, from stats() just before) that tile's GEMM is saved."""
    n, h = x.shape
    v = w.shape[0]
    acc = _ops.acc_dtype(x.dtype)
    dx = torch.zeros((n, h), dtype=acc, device=x.device) if need_x else None
    dw = w.new_empty(w.shape) if need_w else None
    db = torch.zeros((v,), dtype=acc, device=x.device) if need_b else None
    if n == 0 or v == 0 or not (need_x or need_w or need_b):
        if dw is not None:
            dw.zero_()
        return dx, dw, db
    cpu = x.device.type == "cpu"
    whole = tiles.rows >= n  # each slab's d weight in one GEMM over all rows
    ready = ready and whole and flat is not None
    flat = _buffer(x, n, v, tiles) if flat is None else flat
    tmp = x.new_empty((min(tiles.rows, n), h)) if need_x and acc != x.dtype and cpu else None
    ones = x.new_ones((min(tiles.rows, n),)) if need_b and cpu else None
    for s0, s1 in reversed(list(_spans(v, tiles.slab))):
        w_s = w[s0:s1]
        dw_s = (_linear_chunks._WeightGradAccumulator(w_s, tiles.rows, False)
                if need_w and not whole else None)
        for r0, r1 in _spans(n, tiles.rows):
            xc = x[r0:r1]
            if ready:
                g = flat[:n * (s1 - s0)].view(n, s1 - s0)
                ready = False
            else:
                g = _tile(flat, xc, w_s, _part(b, s0, s1))
            _vocab_ops.grad_(g, t[r0:r1], _part(cw, s0, s1), vocab_start + s0,
                             coef[r0:r1], logit_scale, softcap)
            if dx is not None:
                _add_product(dx[r0:r1], g, w_s, tmp)
            if db is not None:
                _linear_chunks._add_bias_grad(db[s0:s1], g, _part(ones, 0, r1 - r0))
            if dw is not None and whole:
                torch.mm(g.t(), xc, out=dw[s0:s1])
            elif dw_s is not None:
                dw_s.add(g, xc)
        if dw_s is not None:
            dw[s0:s1].copy_(dw_s.result())
    return dx, dw, db


def run(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
        class_weight: Tensor | None, ignore_index: int, label_smoothing: float,
        logit_scale: float, softcap: float, z_loss: float, tiles: Plan, need_x: bool,
        need_w: bool, need_b: bool, row_scale: Tensor | None, lse: Tensor | None,
        compact: bool
        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row loss (float32, float64 for float64; 0 for ignored rows) and lse, and the
    gradients of sum(loss rows * row_scale) (row_scale: 0-dim or (N,); None: no gradients)
    with respect to x and weight (in their dtype, final) and bias (accumulation dtype).

    lse given (the backward of 'none'): the statistics pass is skipped, the rows' normalisers
    come from it (_vocab_math.rows_from_lse) and the loss returned is not computed (zeros).
    compact: ignored rows are dropped before the GEMMs (CPU), their loss and lse 0."""
    n, h = x.shape
    v = weight.shape[0]
    acc = _ops.acc_dtype(x.dtype)
    index = None
    if compact and n > 0:
        index = (target != ignore_index).nonzero().squeeze(1)
        if index.numel() == n:
            index = None
    xs, ts, rs, ls_ = x, target, row_scale, lse
    if index is not None:
        xs, ts = x.index_select(0, index), target.index_select(0, index)
        if row_scale is not None and row_scale.dim() > 0:
            rs = row_scale.index_select(0, index)
        if lse is not None:
            ls_ = lse.index_select(0, index)
    loss_s = torch.zeros((xs.shape[0],), dtype=acc, device=x.device)
    opts = (label_smoothing, logit_scale, softcap)
    flat = _buffer(x, xs.shape[0], v, tiles) if xs.shape[0] and v else None
    ready = ls_ is None
    if ls_ is None:
        st = stats(xs, weight, bias, ts, class_weight, 0, ignore_index, *opts, tiles, flat)
        rows = _vocab_math.local_rows(st, ts, v, ignore_index, label_smoothing,
                                      class_weight is not None, "linear_cross_entropy")
        loss_s = _vocab_math.row_loss(rows, label_smoothing, z_loss)
        ls_ = rows.lse
    else:
        rows = _vocab_math.rows_from_lse(ls_, ts, class_weight, v, ignore_index,
                                         label_smoothing)
    dx = dw = db = None
    if row_scale is not None and (need_x or need_w or need_b):
        coef = _vocab_math.grad_coef(rows, rs, label_smoothing, z_loss)
        dx, dw, db = grads(xs, weight, bias, ts, class_weight, 0, coef, logit_scale, softcap,
                           tiles, need_x, need_w, need_b, flat, ready)
        dx = dx.to(x.dtype) if dx is not None else None  # rounded once
    if index is None:
        return loss_s, ls_, dx, dw, db
    loss = torch.zeros((n,), dtype=acc, device=x.device).index_copy_(0, index, loss_s)
    lse_out = torch.zeros((n,), dtype=acc, device=x.device).index_copy_(0, index, ls_)
    if dx is not None:
        dx = x.new_zeros((n, h)).index_copy_(0, index, dx)
    return loss, lse_out, dx, dw, db
