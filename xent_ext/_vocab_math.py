"""Per-row math of a cross entropy whose classes are split into slices: combine the slices'
statistics (xent_ext._vocab_ops.stats) into the row's loss and log-sum-exp, and form the
coefficients of each slice's gradient (xent_ext._vocab_ops.grad).

Only (N,)-sized tensors pass through here; the (N, V) work is in the operators.  The formulas
are those of csrc/xent_row.h (ms_combine, dot_move, index_row_loss, index_grad_coef), written
in ATen operations so that the combine runs on the device of the logits, without host sync:

  the row's reference M is the largest of the slices' references (each the slice's max, or
  for the CPU kernels a value at most 64 below it); log_sum = log sum_j exp(y_j - M);
  loss = (1 - eps) w_t ((M - y_t) + log_sum) + eps / C (W log_sum - D) + z lse^2,
  D = sum_j w_j (y_j - M), W = sum_j w_j, lse = M + log_sum.

The packed tensor summed across slices has one row per logits row, plus one last row whose
first entry counts the classes (so C needs no other collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._vocab_ops import _DOT, _HIT, _MASS, _MAX, _SUM, _WT, _YT


def layout(label_smoothing: float, weighted: bool) -> dict[str, int]:
    """Columns of the packed tensor: sum-exp, target logit, hit count; the target weight only
    with class weights (else it is the hit count); the smoothing sums only with smoothing."""
    cols = ["sum", "y_t", "hit"] + (["w_t"] if weighted else [])
    if label_smoothing > 0:
        cols += ["dot", "mass"]
    return {name: i for i, name in enumerate(cols)}


def _relative(stats: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """The slice's sum-exp and smoothing dot moved to a reference ref >= the slice's own
    (ms_combine, dot_move).  A slice whose max is -inf adds nothing to the sum, but a NaN sum
    must stay NaN (sum * 0, not 0); its dot, taken against 0, stays as it is."""
    m = stats[:, _MAX]
    scale = torch.where(m == -torch.inf, torch.zeros_like(m), (m - ref).exp())
    moved = (m != ref) & (m != -torch.inf)
    dot = stats[:, _DOT]
    return stats[:, _SUM] * scale, torch.where(moved, dot + stats[:, _MASS] * (m - ref), dot)


def merge(a: Tensor, b: Tensor, label_smoothing: float) -> Tensor:
    """The statistics (N, 7) of two slices of the same rows as those of their union (the
    class slabs of one weight, _class_slabs.py): one reference, the larger; the other columns
    summed."""
    ref = torch.maximum(a[:, _MAX], b[:, _MAX])  # NaN propagates
    out = a + b
    out[:, _MAX] = ref
    sum_a, dot_a = _relative(a, ref)
    sum_b, dot_b = _relative(b, ref)
    out[:, _SUM] = sum_a + sum_b
    if label_smoothing > 0:  # else dot and mass are 0 and never read
        out[:, _DOT] = dot_a + dot_b
    return out


def pack(stats: Tensor, gmax: Tensor, num_local: int, label_smoothing: float,
         weighted: bool) -> Tensor:
    """The slice's statistics relative to the row's global max gmax, ready to be summed over
    slices: (N + 1, k), k = 3 to 6 (see layout)."""
    col = layout(label_smoothing, weighted)
    out = stats.new_zeros((stats.shape[0] + 1, len(col)))
    rel_sum, rel_dot = _relative(stats, gmax)
    out[:-1, col["sum"]] = rel_sum
    out[:-1, col["y_t"]] = stats[:, _YT]
    out[:-1, col["hit"]] = stats[:, _HIT]
    if weighted:
        out[:-1, col["w_t"]] = stats[:, _WT]
    if "dot" in col:
        out[:-1, col["dot"]] = rel_dot
        out[:-1, col["mass"]] = stats[:, _MASS]
    out[-1, 0] = float(num_local)
    return out


@dataclass
class Rows:
    """A row's combined statistics (all (N,) in the accumulation dtype, C a 0-dim tensor or,
    from rows_from_lse, a host number)."""

    ref: Tensor
    log_sum: Tensor
    lse: Tensor
    y_t: Tensor
    w_t: Tensor
    valid: Tensor
    num_classes: Tensor | float
    dot: Tensor | None
    mass: Tensor | None


def combine(summed: Tensor, gmax: Tensor, valid: Tensor, label_smoothing: float,
            weighted: bool) -> Rows:
    """The rows' normalisers from the packed statistics summed over every slice."""
    col = layout(label_smoothing, weighted)
    s = summed[:-1]
    # ms_norm: a +inf max makes log_sum NaN (+inf - +inf, as log_softmax).
    log_sum = torch.where(gmax == torch.inf, torch.full_like(gmax, torch.nan),
                          s[:, col["sum"]].log())
    smooth = "dot" in col
    return Rows(ref=gmax, log_sum=log_sum, lse=gmax + log_sum, y_t=s[:, col["y_t"]],
                w_t=s[:, col["w_t" if weighted else "hit"]], valid=valid,
                num_classes=summed[-1, 0], dot=s[:, col["dot"]] if smooth else None,
                mass=s[:, col["mass"]] if smooth else None)


def out_of_bounds(summed: Tensor, valid: Tensor) -> Tensor:
    """True for a non-ignored row whose target no slice holds (or more than one does)."""
    return valid & (summed[:-1, 2] != 1)  # layout: the hit count is column 2


def check_targets(target: Tensor, bad: Tensor, name: str) -> None:
    """A target that no class holds raises as torch ("Target N is out of bounds."): read on
    the host for CPU tensors (no device to wait for), an asynchronous device assertion
    elsewhere (and under torch.compile), so that nothing synchronises."""
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bad.any():
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
        return
    torch._assert_async(~bad.any(), f"{name}: target out of bounds")


def local_rows(stats: Tensor, target: Tensor, num_classes: int, ignore_index: int,
               label_smoothing: float, weighted: bool, name: str) -> Rows:
    """The rows' normalisers when one process holds every class (the statistics merged over
    the slabs of the whole weight): no collective, the slice's max is the row's."""
    gmax = stats[:, _MAX]
    packed = pack(stats, gmax, num_classes, label_smoothing, weighted)
    valid = target != ignore_index
    check_targets(target, out_of_bounds(packed, valid), name)
    return combine(packed, gmax, valid, label_smoothing, weighted)


def rows_from_lse(lse: Tensor, target: Tensor, class_weight: Tensor | None,
                  num_classes: int, ignore_index: int, label_smoothing: float) -> Rows:
    """The rows' normalisers for grad_coef from their log-sum-exp alone (the backward of
    'none', which keeps only the lse): the reference is the lse itself and log_sum 0, so that
    exp(y - ref) is the softmax.  Targets were checked by the forward."""
    valid = target != ignore_index
    zero = torch.zeros_like(lse)
    mass = None
    if class_weight is None:
        w_t = torch.ones_like(lse)
        if label_smoothing > 0:
            mass = torch.full_like(lse, float(num_classes))
    else:
        w = class_weight.to(lse.dtype)
        w_t = w[torch.where(valid, target, torch.zeros_like(target))]
        if label_smoothing > 0:
            mass = w.sum().expand_as(lse)
    # num_classes as a host number: a tensor made from it would be a host-to-device copy.
    return Rows(ref=lse, log_sum=zero, lse=lse, y_t=zero, w_t=w_t, valid=valid,
                num_classes=float(num_classes), dot=None, mass=mass)


def row_loss(r: Rows, label_smoothing: float, z_loss: float) -> Tensor:
    """index_row_loss of every row (0 for an ignored row)."""
    eps = label_smoothing
    loss = (1.0 - eps) * r.w_t * ((r.ref - r.y_t) + r.log_sum)
    if eps > 0:  # only then do the other classes' weights enter (an inf weight elsewhere)
        loss = loss + eps / r.num_classes * (r.mass * r.log_sum - r.dot)
    if z_loss > 0:
        loss = loss + z_loss * r.lse * r.lse
    return torch.where(r.valid, loss, torch.zeros_like(loss))


def divisor(r: Rows) -> Tensor:
    """'mean' divides by the total weight of the non-ignored targets, as torch."""
    return torch.where(r.valid, r.w_t, torch.zeros_like(r.w_t)).sum()


def grad_coef(r: Rows, s: Tensor, label_smoothing: float, z_loss: float) -> Tensor:
    """index_grad_coef for every row: (N, 4) = [ref, a, b, hot], s the rows' gradient scale
    (a 0-dim or (N,) tensor)."""
    eps = label_smoothing
    inv_sum = (-r.log_sum).exp()
    big_a = (1.0 - eps) * r.w_t
    per_class = torch.zeros_like(r.w_t)
    if eps > 0:
        per_class = per_class + eps / r.num_classes
        big_a = big_a + per_class * r.mass
    if z_loss > 0:
        big_a = big_a + 2.0 * z_loss * r.lse
    s = s.to(r.w_t.dtype).expand_as(r.w_t)
    zero = torch.zeros_like(r.w_t)
    # An ignored row: 0 * p_j, NaN where p is; the 0 is not scaled by s (inf for 'mean' when
    # every target is ignored).
    a = torch.where(r.valid, s * big_a * inv_sum, zero * inv_sum)
    b = torch.where(r.valid, s * per_class, zero)
    hot = torch.where(r.valid, s * (1.0 - eps) * r.w_t, zero)
    return torch.stack([r.ref, a, b, hot], dim=1)
