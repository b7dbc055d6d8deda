"""vocab_parallel_cross_entropy: the classes of every row split across the ranks of a group.

Forward, per call: one fused pass over the local logits for the slice's statistics
(xent_ext._vocab_ops.stats), an all-reduce MAX of the per-row local max, and ONE all-reduce SUM
of a packed (N + 1, k) tensor (sum-exp relative to the global max, target logit, a hit count,
the target weight and smoothing sums when used, and the class count: _vocab_math.layout).
DTensor 'mean' over batch-sharded mesh dims adds one all-reduce per such dim.  The backward
communicates nothing: each rank computes its slice of the gradient from its own logits and the
(N, 4) per-row coefficients saved by the forward (no float32 copy of the logits is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _ops, _vocab_math, _vocab_ops
from .._vocab_ops import _MAX
from ..functional import _check_inplace, _check_options, _dtype_name, _needs_composite
from . import _collectives

_INDEX_DTYPES = (torch.int64, torch.uint8)


@dataclass
class _Config:
    group: object
    vocab_start: int
    reduction: int
    ignore_index: int
    label_smoothing: float
    logit_scale: float
    softcap: float
    z_loss: float
    weight_numel: int | None = None  # the full weight vector's length, checked against C
    # Extra groups over which 'mean' sums its numerator and divisor (the batch-sharded mesh
    # dims of a DTensor); empty for a plain call, whose rows are the same on every rank.
    mean_groups: list = field(default_factory=list)


def _forward_rows(x: Tensor, t: Tensor, w: Tensor | None, cfg: _Config):
    """The global rows' normalisers (vocab_math.Rows) from the local logits."""
    st = _vocab_ops.stats(x, t, w, cfg.vocab_start, cfg.ignore_index, cfg.label_smoothing,
                          cfg.logit_scale, cfg.softcap)
    return rows_from_stats(st, t, x.shape[1], cfg, w is not None)


def rows_from_stats(st: Tensor, t: Tensor, num_local: int, cfg: _Config, weighted: bool):
    """The two all-reduces: the local slices' statistics (N, 7) to the global rows."""
    # A copy: for one row the column is a contiguous view that the in-place all-reduce would
    # overwrite with the global max.
    gmax = _collectives.all_reduce(st[:, _MAX].clone(), "max", cfg.group)
    packed = _vocab_math.pack(st, gmax, num_local, cfg.label_smoothing, weighted)
    packed = _collectives.all_reduce(packed, "sum", cfg.group)
    valid = t != cfg.ignore_index
    rows = _vocab_math.combine(packed, gmax, valid, cfg.label_smoothing, weighted)
    _check_bounds(t, packed, valid, rows, cfg)
    return rows


def _check_bounds(t: Tensor, packed: Tensor, valid: Tensor, rows, cfg: _Config) -> None:
    """A target no rank holds raises as torch (_vocab_math.check_targets); so does a full
    class-weight vector whose length is not the vocabulary's."""
    _vocab_math.check_targets(t, _vocab_math.out_of_bounds(packed, valid),
                              "vocab_parallel_cross_entropy")
    if cfg.weight_numel is None:
        return
    bad_weight = rows.num_classes != cfg.weight_numel
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad_weight):
            raise RuntimeError(f"weight tensor should be defined either for all "
                               f"{int(rows.num_classes)} classes or for this rank's "
                               f"classes but got weight tensor of {cfg.weight_numel}")
        return
    torch._assert_async(~bad_weight, "vocab_parallel_cross_entropy: the weight's length "
                        "is neither the vocabulary size nor the local one")


def _reduce(rows_loss: Tensor, zrows: Tensor | None, rows, cfg: _Config):
    """(reduced loss, z-loss term reduced alike or None, gradient scale of every row for an
    incoming gradient of 1)."""
    if cfg.reduction == _ops._REDUCTION_NONE:
        return rows_loss, zrows, rows_loss.new_ones(())
    total = rows_loss.sum()
    ztotal = zrows.sum() if zrows is not None else None
    if cfg.reduction == _ops._REDUCTION_SUM:
        return total, ztotal, total.new_ones(())
    div = _vocab_math.divisor(rows)
    if cfg.mean_groups:
        # numerator, divisor (and z-loss term) summed over the batch-sharded dims at once
        parts = torch.stack([total, div] + ([ztotal] if ztotal is not None else []))
        for g in cfg.mean_groups:
            parts = _collectives.all_reduce(parts, "sum", g)
        total, div = parts[0], parts[1]
        ztotal = parts[2] if ztotal is not None else None
    return total / div, ztotal / div if ztotal is not None else None, 1.0 / div


def loss_and_coef(rows, cfg: _Config):
    """(reduced loss, (N, 4) gradient coefficients for an incoming gradient of 1, z-loss term
    reduced like the loss or None)."""
    rows_loss = _vocab_math.row_loss(rows, cfg.label_smoothing, cfg.z_loss)
    zrows = None
    if cfg.z_loss > 0:
        zrows = torch.where(rows.valid, cfg.z_loss * rows.lse * rows.lse,
                            torch.zeros_like(rows.lse))
    loss, zterm, scale = _reduce(rows_loss, zrows, rows, cfg)
    coef = _vocab_math.grad_coef(rows, scale, cfg.label_smoothing, cfg.z_loss)
    return loss, coef, zterm


def scaled_coef(coef: Tensor, grad_loss: Tensor) -> Tensor:
    """The coefficients for an incoming gradient (0-dim, or one per row)."""
    gl = grad_loss.to(coef.dtype)
    return torch.cat([coef[:, :1], coef[:, 1:] * (gl.reshape(-1, 1) if gl.dim() else gl)],
                     dim=1)


class _VocabCE(torch.autograd.Function):
    """Loss of the global rows from the local logits; the backward computes the local slice of
    the gradient from the saved logits and per-row coefficients (inplace: the forward wrote the
    gradient over the logits and the backward scales it)."""

    @staticmethod
    def forward(ctx, x, t, w, cfg, inplace):
        rows = _forward_rows(x, t, w, cfg)
        loss, coef, zrows = loss_and_coef(rows, cfg)
        ctx.cfg, ctx.inplace, ctx.runs = cfg, inplace, 0
        ctx.has_weight = w is not None
        if inplace:
            _vocab_ops.grad_(x, t, w, cfg.vocab_start, coef, cfg.logit_scale, cfg.softcap)
            if not torch.compiler.is_compiling():
                # Another node that saved these logits now fails loudly at its backward.
                torch.autograd.graph.increment_version(x)
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(x, t, w if w is not None else coef.new_empty(0), coef)
        ctx.mark_non_differentiable(rows.lse)
        if zrows is not None:
            ctx.mark_non_differentiable(zrows)
        return loss.to(x.dtype), rows.lse, zrows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_lse, _grad_z):
        if grad_loss is None:
            return (None,) * 5
        cfg = ctx.cfg
        ctx.runs += 1
        if ctx.inplace:
            if ctx.runs > 1:
                raise RuntimeError(
                    "vocab_parallel_cross_entropy(inplace_backward=True): a second backward "
                    "needs the logits, which the forward overwrote with their gradient")
            (g,) = ctx.saved_tensors
            g = g.detach()
            if not torch.compiler.is_compiling():
                g = g.data  # a version counter of its own: .grad accumulation must not trip it
            _ops.scale_grad_(g.view(g.shape[0], g.shape[1], 1), grad_loss.reshape(-1))
            return g, None, None, None, None
        x, t, w, coef = ctx.saved_tensors
        w = w if ctx.has_weight else None
        g = _vocab_ops.grad(x, t, w, cfg.vocab_start, scaled_coef(coef, grad_loss),
                            cfg.logit_scale, cfg.softcap)
        return g, None, None, None, None


def _check_weight(weight: Tensor, x: Tensor, v: int, vocab_start: int, vocab_size: int | None):
    """The full class-weight vector (length C) or this rank's slice (length V_local): returns
    the local slice and, when the full length could not be checked here, that length."""
    if weight.dim() != 1:
        raise RuntimeError("weight tensor should be 1-D (the class weights), got shape "
                           f"{list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"expected scalar type {_dtype_name(x.dtype)} but found "
                           f"{_dtype_name(weight.dtype)} (weight)")
    if weight.device != x.device:
        raise RuntimeError(f"vocab_parallel_cross_entropy: weight is on {weight.device} but "
                           f"local_logits is on {x.device}; both must be on the same device")
    if weight.requires_grad:
        raise RuntimeError("cross_entropy is not differentiable with respect to argument "
                           "'weight'. This input cannot have requires_grad True.")
    n = weight.numel()
    if vocab_size is not None:
        if n == vocab_size:
            return weight.narrow(0, vocab_start, v), None
        if n == v:
            return weight, None
        raise RuntimeError(f"weight tensor should be defined either for all {vocab_size} "
                           f"classes of the vocabulary or for this rank's {v} classes but got "
                           f"weight tensor of shape: {list(weight.shape)}")
    if n == v:
        return weight, None
    if n >= vocab_start + v:
        return weight.narrow(0, vocab_start, v), n
    raise RuntimeError(f"weight tensor should be defined either for all classes of the "
                       f"vocabulary or for this rank's {v} classes (from {vocab_start}) but "
                       f"got weight tensor of shape: {list(weight.shape)}")


def make_config(like: Tensor, v: int, group, vocab_start, vocab_size, weight, red: int,
                ignore_index, label_smoothing, logit_scale, softcap, z_loss, mean_groups):
    """The slice's place in the vocabulary and the local class weights: (_Config, weight)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy: torch.distributed is not initialized")
    if vocab_start is None:
        vocab_start, vocab_size = _collectives.shard_layout(group, v, like.device)
    elif vocab_start < 0:
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_start must be >= 0, got "
                         f"{vocab_start}")
    weight_numel = None
    if weight is not None:
        weight, weight_numel = _check_weight(weight, like, v, vocab_start, vocab_size)
    cfg = _Config(group, int(vocab_start), red, int(ignore_index), float(label_smoothing),
                  float(logit_scale), float(softcap or 0.0), float(z_loss), weight_numel,
                  list(mean_groups or []))
    return cfg, weight


def check_autograd_mode(name: str, *tensors: Tensor | None) -> None:
    """Forward-mode AD and torch.func transforms would need a forward derivative and batching
    rules through the collectives, which these functions do not have: a clear error instead of
    torch's generic one (reverse mode, loss.backward(), is what they support)."""
    if _needs_composite(*tensors):
        raise NotImplementedError(
            f"{name}: forward-mode AD (dual tensors) and torch.func transforms (grad, vmap, "
            f"jacrev, hessian, ...) are not supported; use reverse mode (loss.backward() or "
            f"torch.autograd.grad)")


def check_target(like: Tensor, target: Tensor, expected: tuple) -> None:
    if target.dtype not in _INDEX_DTYPES:
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{_dtype_name(target.dtype)}")
    if tuple(target.shape) != tuple(expected):
        raise ValueError(f"vocab_parallel_cross_entropy: expected target of shape "
                         f"{list(expected)}, got {list(target.shape)}")


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
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
    inplace_backward: bool = False,
    _vocab_size: int | None = None,
    _mean_groups: list | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """F.cross_entropy of the logits concatenated over the ranks of `group` along the classes.

    local_logits (..., V_local) on each rank holds the classes [vocab_start, vocab_start +
    V_local) of the vocabulary (the classes are the LAST dimension, as a language-model head
    produces them; shards may be uneven, ranks hold consecutive slices in rank order when
    vocab_start is not given, which an all-gather of V_local then infers once per group and
    size).  target (...) holds global class indices and is the same on every rank.

    Every rank gets the loss of the global rows and the gradient of its own slice.  Options
    as xent_ext.cross_entropy: weight is either the full class-weight vector (length C) or
    this rank's slice (length V_local); label smoothing spreads eps / C over the C global
    classes, z_loss is on the global lse, return_lse gives the global lse (float32, float64
    for float64 logits).  Returns the loss, or (loss, z_loss term?, lse?).

    Communication: two all-reduces in the forward (MAX of (N,), SUM of (N + 1, k) in the
    accumulation dtype), none in the backward.
    """
    red = _check_options(local_logits, target, None, reduction, label_smoothing, z_loss,
                         softcap, logit_scale)
    if local_logits.dim() == 0:
        raise RuntimeError("vocab_parallel_cross_entropy: local_logits must have at least one "
                           "dimension (the classes, last)")
    check_autograd_mode("vocab_parallel_cross_entropy", local_logits, weight)
    check_target(local_logits, target, tuple(local_logits.shape[:-1]))
    v = local_logits.shape[-1]
    cfg, weight = make_config(local_logits, v, group, vocab_start, _vocab_size, weight, red,
                              ignore_index, label_smoothing, logit_scale, softcap, z_loss,
                              _mean_groups)
    row_shape = tuple(local_logits.shape[:-1])
    x2 = local_logits.reshape(math.prod(row_shape), v)  # not -1: a rank may hold no classes
    t = target.reshape(-1).long()
    compute_grad = torch.is_grad_enabled() and x2.requires_grad
    if inplace_backward and compute_grad:
        _check_inplace(local_logits, x2)
    loss, lse, zterm = _VocabCE.apply(x2, t, weight, cfg, bool(inplace_backward and
                                                               compute_grad))
    return outputs(loss, lse, zterm, red, row_shape, return_z_loss, return_lse,
                   local_logits.dtype)


def outputs(loss, lse, zterm, red, row_shape, return_z_loss, return_lse, dtype):
    """loss, or (loss, z-loss term?, lse?), shaped as the rows."""
    if red == _ops._REDUCTION_NONE:
        loss = loss.reshape(row_shape)
    if not (return_z_loss or return_lse):
        return loss
    out = [loss]
    if return_z_loss:
        if zterm is None:
            zterm = loss.new_zeros(row_shape if red == _ops._REDUCTION_NONE else ())
        out.append(zterm.detach().reshape(loss.shape).to(dtype))
    if return_lse:
        out.append(lse.detach().reshape(row_shape))
    return tuple(out)
