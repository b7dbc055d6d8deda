"""The fused linear + cross-entropy as torch.library custom operators, with fake kernels and
autograd, so that torch.compile(fullgraph=True) traces a call into one node per op.

linear_cross_entropy_fwd: input (N, H), weight (V, H), target (N,) int64, bias (V,)?,
  class_weight (V,)? -> (loss, lse, d input, d weight, d bias).  The loss is reduced ('none':
  per row); lse is per row (float32, float64 for float64).  For 'mean' and 'sum' the gradients
  of the reduced loss are computed in the same chunk loop, for the inputs flagged, else they
  are empty tensors.
linear_cross_entropy_bwd: the gradients of sum(loss rows * grad_rows), recomputed tile by
  tile: the backward of reduction 'none', exact for any incoming gradient (with class slabs,
  from the forward's lse: no statistics pass).

Both take the tiling of _linear_plan.plan(): chunk_rows, and slab_classes (0: the rows
strategy of _linear_chunks.py; else the class slabs of _class_slabs.py, into whose gradient
coefficients the reduction's scale is folded).

Backward of 'mean' / 'sum': the first one scales the forward's gradients in place by the
incoming gradient (scale_grad_, nothing to do when it is exactly 1, decided on the device) and
hands them on with version counters of their own, as _ops.py does for the row op; a later
backward through a retained graph recomputes them (the chunk loop again), so it is exact too.
A backward that builds a graph (create_graph=True) raises: the chunk loop has no derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _class_slabs, _linear_chunks, _ops
from ._linear_plan import Plan

_MEAN, _NONE = _ops._REDUCTION_MEAN, _ops._REDUCTION_NONE


def _compact(x: Tensor, keep_lse: bool) -> bool:
    """CPU: ignored rows are dropped before the GEMMs (their number is known to the host at no
    cost), unless the caller wants every row's lse.  CUDA: masked rows, no host sync."""
    return x.device.type == "cpu" and not keep_lse


def _inv_total(target: Tensor, class_weight: Tensor | None, ignore_index: int,
               acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """('mean''s divisor, its reciprocal): the total weight of the non-ignored targets; all
    rows ignored: the loss is 0 / 0 = NaN as torch's, the gradients 0 as torch's (not 0 *
    inf), so the reciprocal is 0 then."""
    valid = target != ignore_index
    if class_weight is None:
        divisor = valid.sum(dtype=acc)
    else:
        safe = target.clamp(0, max(class_weight.numel() - 1, 0))
        w_t = class_weight.to(acc)[safe]
        divisor = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
    return divisor, torch.where(valid.any(), divisor.reciprocal(), torch.zeros_like(divisor))


def _reduce(loss_rows: Tensor, target: Tensor, class_weight: Tensor | None, reduction: int,
            ignore_index: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(loss in dtype, 1 / total weight for 'mean' or None); the sum in float32."""
    acc = _ops.acc_dtype(dtype)
    if reduction == _NONE:
        return loss_rows.to(dtype), None
    total = loss_rows.sum(dtype=acc)
    if reduction != _MEAN:
        return total.to(dtype), None
    divisor, inv = _inv_total(target, class_weight, ignore_index, acc)
    return (total / divisor).to(dtype), inv


def _finish(grad: Tensor | None, inv: Tensor | None, dtype: torch.dtype, like: Tensor) -> Tensor:
    """The gradient scaled for 'mean' and rounded once, or an empty tensor of its own (outputs
    of a custom op may not alias each other)."""
    if grad is None:
        return like.new_empty((0,))
    if inv is not None:
        grad.mul_(inv)
    return grad.to(dtype)


@torch.library.custom_op("xent_ext::linear_cross_entropy_fwd", mutates_args=())
def fwd(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
        class_weight: Tensor | None, reduction: int, ignore_index: int, label_smoothing: float,
        logit_scale: float, softcap: float, z_loss: float, chunk_rows: int, slab_classes: int,
        keep_lse: bool, need_input: bool, need_weight: bool, need_bias: bool
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = reduction != _NONE
    needs = (grads and need_input, grads and need_weight, grads and need_bias)
    options = (ignore_index, label_smoothing, logit_scale, softcap, z_loss)
    compact = _compact(input, keep_lse)
    if slab_classes > 0:
        # The reduction's scale enters the gradient coefficients: each gradient is rounded
        # once, at the end of its GEMM.
        scale = None
        if reduction == _MEAN:
            scale = _inv_total(target, class_weight, ignore_index,
                               _ops.acc_dtype(input.dtype))[1]
        elif grads:
            scale = input.new_ones((), dtype=_ops.acc_dtype(input.dtype))
        loss_rows, lse, dx, dw, db = _class_slabs.run(
            input, weight, target, bias, class_weight, *options,
            Plan(rows=chunk_rows, slab=slab_classes), *needs, scale, None, compact)
        loss, _ = _reduce(loss_rows, target, class_weight, reduction, ignore_index,
                          input.dtype)
        inv = None  # already in the gradients
    else:
        loss_rows, lse, dx, dw, db = _linear_chunks.run(
            input, weight, target, bias, class_weight, *options, chunk_rows, *needs, None,
            compact)
        loss, inv = _reduce(loss_rows, target, class_weight, reduction, ignore_index,
                            input.dtype)
    return (loss, lse, _finish(dx, inv, input.dtype, input), _finish(dw, inv, weight.dtype, input),
            _finish(db, inv, input.dtype, input))


@fwd.register_fake
def _fwd_fake(input, weight, target, bias, class_weight, reduction, ignore_index,
              label_smoothing, logit_scale, softcap, z_loss, chunk_rows, slab_classes,
              keep_lse, need_input, need_weight, need_bias):
    n = input.shape[0]
    grads = reduction != _NONE
    loss = input.new_empty((n,) if reduction == _NONE else ())
    lse = input.new_empty((n,), dtype=_ops.acc_dtype(input.dtype))
    dx = input.new_empty(input.shape if grads and need_input else (0,))
    dw = weight.new_empty(weight.shape if grads and need_weight else (0,))
    db = (bias.new_empty(bias.shape) if grads and need_bias and bias is not None
          else input.new_empty((0,)))
    return loss, lse, dx, dw, db


@torch.library.custom_op("xent_ext::linear_cross_entropy_bwd", mutates_args=())
def bwd(grad_rows: Tensor, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
        class_weight: Tensor | None, ignore_index: int, label_smoothing: float,
        logit_scale: float, softcap: float, z_loss: float, chunk_rows: int, slab_classes: int,
        lse: Tensor | None, need_input: bool, need_weight: bool, need_bias: bool
        ) -> tuple[Tensor, Tensor, Tensor]:
    options = (ignore_index, label_smoothing, logit_scale, softcap, z_loss)
    needs = (need_input, need_weight, need_bias and bias is not None)
    if slab_classes > 0:
        if lse is None:
            raise RuntimeError("linear_cross_entropy_bwd: the class-slab strategy needs the "
                               "forward's lse")
        _, _, dx, dw, db = _class_slabs.run(
            input, weight, target, bias, class_weight, *options,
            Plan(rows=chunk_rows, slab=slab_classes), *needs, grad_rows.contiguous(), lse,
            _compact(input, False))
    else:
        _, _, dx, dw, db = _linear_chunks.run(
            input, weight, target, bias, class_weight, *options, chunk_rows, *needs,
            grad_rows.contiguous(), _compact(input, False))
    return (_finish(dx, None, input.dtype, input), _finish(dw, None, weight.dtype, input),
            _finish(db, None, input.dtype, input))


@bwd.register_fake
def _bwd_fake(grad_rows, input, weight, target, bias, class_weight, ignore_index,
              label_smoothing, logit_scale, softcap, z_loss, chunk_rows, slab_classes, lse,
              need_input, need_weight, need_bias):
    dx = input.new_empty(input.shape if need_input else (0,))
    dw = weight.new_empty(weight.shape if need_weight else (0,))
    db = (bias.new_empty(bias.shape) if need_bias and bias is not None
          else input.new_empty((0,)))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    (input, weight, target, bias, class_weight, reduction, *_rest) = inputs
    _, lse, dx, dw, db = output
    ctx.mark_non_differentiable(lse, dx, dw, db)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.options = inputs[6:13]  # ignore_index .. slab_classes
    ctx.has_bias = bias is not None
    ctx.has_class_weight = class_weight is not None
    ctx.backward_runs = 0
    ctx.computed = inputs[14:17]  # the gradients the forward computed
    # The class slabs' backward of 'none' starts from each row's lse (no statistics pass).
    ctx.has_lse = reduction == _NONE and inputs[12] > 0
    empty = lse.new_empty((0,))
    ctx.save_for_backward(input, weight, target, bias if bias is not None else empty,
                          class_weight if class_weight is not None else empty, dx, dw, db,
                          lse if ctx.has_lse else empty)


def _scaled_in_place(grad: Tensor, grad_loss: Tensor) -> Tensor:
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        # Traced (torch.compile, AOTAutograd: fake or functional tensor subclasses): a graph's
        # backward may not mutate a tensor its forward returned (the partitioner refuses the
        # node), so out of place there, at the cost of a transient copy.
        return grad * grad_loss.to(grad.dtype)
    grad = grad.data  # a version counter of its own (see _ops.py)
    _ops.scale_grad_(grad.view(grad.shape[0], -1, 1), grad_loss)
    return grad


def _backward(ctx, grad_loss, _g_lse, _g_dx, _g_dw, _g_db):
    if grad_loss is None:
        return (None,) * 17
    if torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy: a backward that builds a graph "
                           "(create_graph=True, double backward) is not supported")
    input, weight, target, bias, class_weight, dx, dw, db, lse = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    class_weight = class_weight if ctx.has_class_weight else None
    need = ctx.needs_input_grad
    if ctx.reduction == _NONE:
        dx, dw, db = bwd(grad_loss.reshape(-1), input, weight, target, bias, class_weight,
                         *ctx.options, lse if ctx.has_lse else None, need[0], need[1], need[3])
    else:
        ctx.backward_runs += 1
        missing = any(n and not c for n, c in zip((need[0], need[1], need[3]), ctx.computed,
                                                  strict=True))
        if ctx.backward_runs == 1 and not missing:
            dx, dw, db = (_scaled_in_place(g, grad_loss) if g.numel() else g
                          for g in (dx, dw, db))
        else:
            # The first backward scaled and handed out these buffers (or the forward was
            # told not to compute one that is needed now): recompute.
            _, _, dx, dw, db = fwd(input, weight, target, bias, class_weight, ctx.reduction,
                                   *ctx.options, True, need[0], need[1], need[3])
            dx, dw, db = (g * grad_loss.to(g.dtype) for g in (dx, dw, db))
    return ((dx if need[0] else None), (dw if need[1] else None), None,
            (db if need[3] and bias is not None else None)) + (None,) * 13


fwd.register_autograd(_backward, setup_context=_setup_context)
