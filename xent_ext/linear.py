"""xent_ext.linear_cross_entropy: a language-model head's loss without its full logits.

    linear_cross_entropy(input, weight, target, bias) == cross_entropy(F.linear(input, weight,
    bias), target)

with every option of xent_ext.cross_entropy.  The logits are produced a tile at a time into
one reused buffer and turned into loss and gradient at once, by chunks of rows
(_linear_chunks.py) or by slabs of classes (_class_slabs.py), as _linear_plan.py decides from
the memory budget: beyond the inputs, the parameters and their gradients a call holds one
tile, O(N) vectors and a float32 accumulator (of d weight for rows chunks of a half weight, of
d input for class slabs of half inputs); never anything of size N x V.  Argument checks follow
F.linear and F.cross_entropy (same exception types, messages naming the argument); nothing
here reads a tensor's values on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _legacy_reduction

from . import _linear_ops, _linear_plan, _ops
from .functional import (
    _check_llm_options,
    _dtype_name,
    _needs_composite,
    _z_loss_term,
    cross_entropy,
)


def _check(input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
           class_weight: Tensor | None, label_smoothing: float, z_loss: float,
           softcap: float | None, logit_scale: float, chunk_size: int | None,
           chunk_bytes: int | None) -> None:
    if not input.is_floating_point():
        raise NotImplementedError("linear_cross_entropy: input must be a floating point tensor "
                                  f"(float16, bfloat16, float32 or float64), got {input.dtype}")
    if input.dim() < 1:
        raise RuntimeError("linear_cross_entropy: input must have at least one dimension (the "
                           "features), got a 0-dim tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"linear_cross_entropy: weight must be 2-D (classes, features), got "
                           f"shape {list(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        rows = math.prod(input.shape[:-1])
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x"
                           f"{input.shape[-1]} and {weight.shape[1]}x{weight.shape[0]})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise RuntimeError(f"linear_cross_entropy: expected {name} to have the input's "
                               f"dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"linear_cross_entropy: {name} is on {t.device} but input is on "
                               f"{input.device}; both must be on the same device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"linear_cross_entropy: bias must be ({weight.shape[0]},), got "
                           f"shape {list(bias.shape)}")
    if target.is_floating_point():
        raise NotImplementedError("linear_cross_entropy: class-probability targets are not "
                                  "supported; pass class indices")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{_dtype_name(target.dtype)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"Expected input batch_size ({math.prod(input.shape[:-1])}) to match "
                         f"target batch_size ({target.numel()}): target must have the shape "
                         f"of input without its last dimension, {list(input.shape[:-1])}, "
                         f"got {list(target.shape)}")
    if target.device != input.device:
        raise RuntimeError(f"linear_cross_entropy: target is on {target.device} but input is on "
                           f"{input.device}; both must be on the same device")
    n_classes = weight.shape[0]
    if class_weight is not None:
        if class_weight.dim() != 1 or class_weight.numel() != n_classes:
            raise RuntimeError("weight tensor should be defined either for all "
                               f"{n_classes} classes or no classes but got weight tensor "
                               f"of shape: {list(class_weight.shape)}")
        if class_weight.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_dtype_name(input.dtype)} but found "
                               f"{_dtype_name(class_weight.dtype)} (class_weight)")
        if class_weight.device != input.device:
            raise RuntimeError(f"linear_cross_entropy: class_weight is on "
                               f"{class_weight.device} but input is on {input.device}")
        if class_weight.requires_grad:
            raise RuntimeError("linear_cross_entropy is not differentiable with respect to "
                               "argument 'class_weight'. This input cannot have requires_grad "
                               "True.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError("label_smoothing must be between 0.0 and 1.0. Got: "
                           f"{label_smoothing}")
    _check_llm_options("linear_cross_entropy", z_loss, softcap, logit_scale)
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError("linear_cross_entropy: pass chunk_size or chunk_bytes, not both")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"linear_cross_entropy: chunk_bytes must be >= 1, got {chunk_bytes}")


def _rows_shaped(out, row_shape, red, return_z_loss, return_lse):
    """The logits path's results, computed on (N, C) rows, with the per-row ones (the loss and
    z-loss term for 'none', the lse) back in the target's shape."""
    outs = list(out) if isinstance(out, tuple) else [out]
    none = red == _ops._REDUCTION_NONE
    per_row = [none] + ([none] if return_z_loss else []) + ([True] if return_lse else [])
    outs = [o.reshape(row_shape) if r else o for o, r in zip(outs, per_row, strict=True)]
    return tuple(outs) if len(outs) > 1 else outs[0]


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
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
    """cross_entropy(F.linear(input, weight, bias), target, ...) without the full logits.

    input (..., H), target (...) class indices (int64 or uint8), weight (V, H) and bias (V,)
    as F.linear's (the language-model head's parameters); float16, bfloat16, float32,
    float64; gradients for input, weight and bias.  `class_weight` (V,) is F.cross_entropy's
    `weight` argument (renamed: `weight` here is the linear layer's, as in F.linear).
    ignore_index, reduction, label_smoothing and the language-model options z_loss,
    return_z_loss, softcap, logit_scale, return_lse mean what they mean in
    xent_ext.cross_entropy.  Class-probability targets are not supported (they raise).

    Memory: the logits are produced a tile at a time into one reused buffer of at most
    `chunk_bytes` (default: on the CPU 32 MiB for 16-bit dtypes, 12 MiB otherwise; 256 MiB on
    CUDA), either `chunk_size` rows (at least 256 by default) x all classes, three GEMMs, or,
    when that chunk and its float32 weight-gradient accumulator would not fit, every row x a
    slab of classes in two passes (statistics, then gradients), four GEMMs, each slab's weight
    gradient one GEMM.  The weight and bias gradients are accumulated in float32 (float64 for
    float64) and rounded once.  For 'mean' and 'sum' the gradients are computed in the
    forward and the backward only scales them; for 'none' the backward recomputes the logits
    tile by tile, exact for any incoming gradient.

    Ignored rows: on the CPU they are dropped before the GEMMs (a compaction: the host knows
    their count at no cost), unless return_lse=True asks for every row's log-sum-exp; on CUDA
    they go through the GEMMs masked (the row op gives them zero loss and gradient), so that
    nothing synchronises with the host.

    Under torch.func transforms (grad, vmap, hessian, ...) and forward-mode AD the logits are
    written out in full and the loss is xent_ext.cross_entropy's there (its ATen composite):
    the chunked operators have no forward derivative or batching rule.

    Returns the loss, or (loss, z_loss term?, lse?) in that order when asked for, as
    xent_ext.cross_entropy.
    """
    red = _legacy_reduction.get_enum(reduction)
    _check(input, weight, target, bias, class_weight, label_smoothing, z_loss, softcap,
           logit_scale, chunk_size, chunk_bytes)
    if _needs_composite(input, weight, bias):
        out = cross_entropy(F.linear(input, weight, bias).flatten(0, -2), target.reshape(-1),
                            class_weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, z_loss=z_loss,
                            return_z_loss=return_z_loss, softcap=softcap,
                            logit_scale=logit_scale, return_lse=return_lse)
        return _rows_shaped(out, tuple(target.shape), red, return_z_loss, return_lse)
    row_shape = tuple(target.shape)
    x2 = input.reshape(-1, input.shape[-1])
    t1 = target.reshape(-1).long()
    n, v = x2.shape[0], weight.shape[0]
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (x2, weight, bias)]
    tiles = _linear_plan.plan(n, v, x2.shape[1], input.dtype, input.device, chunk_size,
                              chunk_bytes, need[1])
    loss, lse, _dx, _dw, _db = _linear_ops.fwd(
        x2, weight, t1, bias, class_weight, red, ignore_index, float(label_smoothing),
        float(logit_scale), float(softcap or 0.0), float(z_loss), tiles.rows, tiles.slab,
        return_lse, *need)
    if red == _ops._REDUCTION_NONE:
        loss = loss.reshape(row_shape)
    if not (return_z_loss or return_lse):
        return loss
    out = [loss]
    if return_z_loss:
        out.append(_z_loss_term(lse, t1, class_weight, False, red, ignore_index, z_loss,
                                row_shape, input.dtype))
    if return_lse:
        out.append(lse.reshape(row_shape))
    return tuple(out)
