"""The rows strategy of the fused linear + cross-entropy (_linear_plan.py): its chunk loop, in
ATen operations.

A chunk of rows at a time: its logits are produced by one GEMM into a reused buffer, the fused
row op (cross_entropy_fwd_inplace_) turns them into per-row loss, log-sum-exp and, in place,
the logits' gradient, and that gradient is consumed at once: d input for the chunk (a GEMM into
its rows of d input), d bias and d weight accumulated in float32 (float64 for float64) into one
buffer each, rounded to the parameters' dtype once at the end (half-precision d input is
written by its GEMM in the input dtype, and for 'mean' scaled after: a second rounding).
Nothing the size of N x V is ever allocated: beyond the inputs and the gradients the loop
holds one chunk x V buffer, the accumulators and O(N) vectors.

The row op is always called with reduction 'none', whose gradient is the gradient of the sum
of the chunk's rows.  'mean' is the sum divided by the total weight of the non-ignored rows of
the whole batch, which no chunk knows: the gradients are accumulated for the sum and scaled by
the reciprocal of that total (a device tensor: no host synchronisation) once at the end.  That
costs one pass over d input and d weight, where passing a per-chunk scale to the row op would
cost a pass over every chunk's logits (N x V in all), and GEMM alphas must be host numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops

_NONE = _ops._REDUCTION_NONE

def _weight_slice_rows(v: int, h: int, rows: int) -> int:
    """Classes per slice of the weight-gradient GEMM where it cannot write float32 from half
    inputs (CPU): a temporary of slice x H, at most an eighth of the weight and about the
    logits chunk's size."""
    per = max(64, (rows * v) // max(1, h) // 64 * 64)
    return max(1, min(v, per, -(-v // 8) if v >= 512 else v))


class _WeightGradAccumulator:
    """d weight (V, H) += g.T @ x in float32 (float64 for float64), one chunk at a time.

    The first chunk writes the buffer (no zero-filling pass over V x H).  Half-precision
    weights on the CPU, whose backend has no half x half -> float32 GEMM: when the whole batch
    is one chunk there is nothing to accumulate, so the gradient is one GEMM in the weight
    dtype (float32 accumulation inside the GEMM; for 'mean' the later scaling rounds a second
    time, within one ulp) and no float32 buffer of the weight's size is allocated; otherwise a
    GEMM per slice of classes into a half temporary, added into the float32 buffer."""

    def __init__(self, weight: Tensor, rows: int, single_chunk: bool):
        self.acc_dtype = _ops.acc_dtype(weight.dtype)
        self.shape, self.device = weight.shape, weight.device
        self.half_cpu = weight.dtype != self.acc_dtype and weight.device.type == "cpu"
        self.single = single_chunk and self.half_cpu
        self.slice = _weight_slice_rows(weight.shape[0], weight.shape[1], rows)
        self.acc: Tensor | None = None
        self.tmp: Tensor | None = None

    def add(self, g: Tensor, x: Tensor) -> None:
        first = self.acc is None
        if self.single:
            self.acc = torch.mm(g.t(), x)
        elif not self.half_cpu:
            if first:
                self.acc = torch.zeros(self.shape, dtype=self.acc_dtype, device=self.device)
            if g.dtype == self.acc_dtype:
                self.acc.addmm_(g.t(), x)  # beta = 1: accumulated by the GEMM itself
            else:
                # cuBLAS reads the half inputs and accumulates into the float32 buffer.
                torch.addmm(self.acc, g.t(), x, out_dtype=self.acc_dtype, out=self.acc)
        else:
            if first:
                self.acc = torch.empty(self.shape, dtype=self.acc_dtype, device=self.device)
                self.tmp = g.new_empty((min(self.slice, self.shape[0]), x.shape[1]))
            for s in range(0, g.shape[1], self.slice):
                e = min(g.shape[1], s + self.slice)
                part = self.tmp[:e - s]
                torch.mm(g[:, s:e].t(), x, out=part)
                if first:
                    self.acc[s:e].copy_(part)
                else:
                    self.acc[s:e].add_(part)

    def result(self) -> Tensor:
        if self.acc is None:  # no rows at all
            return torch.zeros(self.shape, dtype=self.acc_dtype, device=self.device)
        return self.acc


def _add_bias_grad(db: Tensor, g: Tensor, ones: Tensor) -> None:
    """d bias += column sums of g, accumulated in db's dtype.  CPU: as a GEMV against ones
    (a column reduction is several times slower there); half g gives a half GEMV result
    (float32 inside), added into the float32 buffer.  CUDA: a reduction in float32."""
    if g.device.type != "cpu":
        db.add_(g.sum(0, dtype=db.dtype))
    elif g.dtype == db.dtype:
        db.addmv_(g.t(), ones)
    else:
        db.add_(torch.mv(g.t(), ones))


def run(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
        class_weight: Tensor | None, ignore_index: int, label_smoothing: float,
        logit_scale: float, softcap: float, z_loss: float, rows: int, need_x: bool,
        need_w: bool, need_b: bool, row_scale: Tensor | None, compact: bool
        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row loss (input dtype, 0 for ignored rows), per-row lse (accumulation dtype) and the
    gradients of sum(loss rows * row_scale) (row_scale None: 1) with respect to x (N, H),
    weight and bias, in float32/float64 accumulators for weight and bias (unrounded).

    compact: drop the ignored rows before the GEMMs (CPU: the host knows their number at no
    cost); their loss is 0 and their lse 0 (not computed: callers that
    return the lse pass compact=False).  Otherwise they run through the GEMMs
    masked: the row op gives them zero loss and gradient (CUDA: no host synchronisation)."""
    n, h = x.shape
    v = weight.shape[0]
    acc = _ops.acc_dtype(x.dtype)
    loss = x.new_zeros((n,))
    lse = x.new_zeros((n,), dtype=acc)
    db = torch.zeros((v,), dtype=acc, device=x.device) if need_b else None
    need_grad = need_x or need_w or need_b

    index = None
    if compact and n > 0:
        index = (target != ignore_index).nonzero().squeeze(1)
        if index.numel() == n:
            index = None  # nothing ignored: no copies
    if index is not None:
        xs, ts = x.index_select(0, index), target.index_select(0, index)
        rs = row_scale.index_select(0, index) if row_scale is not None else None
    else:
        xs, ts, rs = x, target, row_scale
    m = xs.shape[0]
    # Every row of d input is written by its chunk's GEMM, except the dropped (ignored) rows.
    dx = (x.new_zeros((n, h)) if index is not None else x.new_empty((n, h))) if need_x else None
    loss_s = loss if index is None else loss.new_empty((m,))
    lse_s = lse if index is None else lse.new_empty((m,))
    dx_s = dx if index is None or dx is None else dx.new_empty((m, h))

    dw = _WeightGradAccumulator(weight, rows, m <= rows) if need_w else None
    ones = x.new_ones((min(rows, m),)) if need_b and x.device.type == "cpu" else None
    buf = x.new_empty((min(rows, m), v)) if m > 0 else None
    wt = weight.t()
    for s in range(0, m, rows):
        e = min(m, s + rows)
        xc, tc = xs[s:e], ts[s:e]
        logits = buf[:e - s]
        if bias is not None:
            torch.addmm(bias, xc, wt, out=logits)
        else:
            torch.mm(xc, wt, out=logits)
        l3 = logits.view(e - s, v, 1)
        if need_grad:
            loss_c, lse_c = _ops.fwd_inplace_(l3, tc.view(-1, 1), class_weight, _NONE,
                                              ignore_index, label_smoothing, logit_scale,
                                              softcap, z_loss)
            if rs is not None:
                _ops.scale_grad_(l3, rs[s:e])  # 'none': each row by its incoming gradient
            g = logits  # now the gradient of the chunk's rows
            if dx_s is not None:
                torch.mm(g, weight, out=dx_s[s:e])
            if db is not None:
                _add_bias_grad(db, g, ones[:e - s] if ones is not None else None)
            if dw is not None:
                dw.add(g, xc)
        else:
            loss_c, lse_c, _ = _ops.fwd(l3, tc.view(-1, 1), class_weight, _NONE, ignore_index,
                                        label_smoothing, logit_scale, softcap, z_loss, False)
        loss_s[s:e] = loss_c.view(-1)
        lse_s[s:e] = lse_c.view(-1)

    if index is not None:
        loss.index_copy_(0, index, loss_s)
        lse.index_copy_(0, index, lse_s)
        if dx is not None:
            dx.index_copy_(0, index, dx_s)
    return loss, lse, dx, (dw.result() if dw is not None else None), db
