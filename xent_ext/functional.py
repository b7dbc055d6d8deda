"""xent_ext.cross_entropy: F.cross_entropy's signature and semantics on the fused kernels.

The Python layer validates the arguments the way PyTorch does (same exception types, messages
that name the argument), brings the input to the (N, C, S) layout the kernels walk, and calls
one operator.  Nothing here reads a tensor's values, so the call never synchronises with the
device and traces into a single graph under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor
from torch.nn import _reduction as _legacy_reduction

from . import _composite, _ops

_INDEX_DTYPES = (torch.int64, torch.uint8)


def _check_target(input: Tensor, target: Tensor, ignore_index: int) -> bool:
    """Returns True for probability targets, else checks a class-index target's shape."""
    if input.dim() == 0 and (input.shape != target.shape or target.is_floating_point()):
        raise RuntimeError("cross_entropy: input must have at least one dimension (the "
                           "classes), got a 0-dim tensor")
    if input.shape == target.shape:
        # As torch: equal shapes mean class probabilities (a 0-dim input only gets this far
        # with an integer target, to fail here with torch's message).
        if not target.is_floating_point():
            raise RuntimeError("Expected floating point type for target with class "
                               f"probabilities, got {_dtype_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        return True
    # In torch's order: the batch size before the dtype.
    if input.dim() >= 2 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
        got = target.shape[0] if target.dim() > 0 else 0
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({got}).")
    if target.dtype not in _INDEX_DTYPES:
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{_dtype_name(target.dtype)}")
    if input.dim() == 1:
        if target.dim() != 0:
            raise RuntimeError(f"Expected target size [] for input of size {list(input.shape)},"
                               f" got {list(target.shape)}")
        return False
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    return False


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool", torch.float32: "Float",
            torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype))


def _check_options(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str,
                   label_smoothing: float, z_loss: float, softcap: float | None,
                   logit_scale: float) -> int:
    if not input.is_floating_point():
        # NotImplementedError, as torch (whose log_softmax has no integer kernel).
        raise NotImplementedError("cross_entropy: input must be a floating point tensor "
                                  f"(float16, bfloat16, float32 or float64), got {input.dtype}")
    # torch's own mapping: ValueError for an unknown name, the deprecated 'elementwise_mean'
    # accepted as 'mean' with torch's warning.
    red = _legacy_reduction.get_enum(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError("label_smoothing must be between 0.0 and 1.0. Got: "
                           f"{label_smoothing}")
    if target.device != input.device:
        raise RuntimeError(f"cross_entropy: target is on {target.device} but input is on "
                           f"{input.device}; both must be on the same device")
    n_classes = 1 if input.dim() == 0 else input.shape[0 if input.dim() == 1 else 1]
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise RuntimeError("weight tensor should be defined either for all "
                               f"{n_classes} classes or no classes but got weight tensor "
                               f"of shape: {list(weight.shape)}")
        # Class-index targets need the input's dtype (nll_loss's check); probability targets
        # are computed in the promoted dtype, as torch's elementwise product does.
        if (weight.dtype != input.dtype and not _is_prob_target(input, target)
                and not _autocast_to_float32(input)):
            raise RuntimeError(f"expected scalar type {_dtype_name(input.dtype)} but found "
                               f"{_dtype_name(weight.dtype)} (weight)")
        if weight.device != input.device:
            raise RuntimeError(f"cross_entropy: weight is on {weight.device} but input is on "
                               f"{input.device}; both must be on the same device")
        if weight.requires_grad:
            raise RuntimeError("cross_entropy is not differentiable with respect to argument "
                               "'weight'. This input cannot have requires_grad True.")
    _check_llm_options("cross_entropy", z_loss, softcap, logit_scale)
    return red


def _check_llm_options(fn: str, z_loss: float, softcap: float | None,
                       logit_scale: float) -> None:
    """The language-model options' ranges, for every entry point (`fn` names it)."""
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) these may be symbolic.
    if not (0.0 <= z_loss < math.inf):
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (0.0 < softcap < math.inf):
        raise ValueError(f"{fn}: softcap must be a finite number > 0, got {softcap}")
    if not (-math.inf < logit_scale < math.inf):
        raise ValueError(f"{fn}: logit_scale must be finite, got {logit_scale}")


def _is_prob_target(input: Tensor, target: Tensor) -> bool:
    return input.shape == target.shape and target.is_floating_point()


def _autocast_to_float32(input: Tensor) -> bool:
    """Under autocast torch runs cross_entropy in float32 (it is on autocast's float32 list)."""
    return (input.dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled(input.device.type))


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Cross entropy between logits and targets, as torch.nn.functional.cross_entropy.

    Same arguments, defaults, reductions, errors and results (loss and gradient) as
    F.cross_entropy: class-index or class-probability targets, class weights, ignore_index,
    label smoothing, (N, C), (N, C, d1, ..., dk) and (C,) inputs, the legacy size_average and
    reduce.  Loss and gradient come from one fused pass over the logits; the loss is kept in
    float32 (float64 for float64 input) and rounded to the input dtype once.

    Keyword-only extensions for language-model training, all off by default:
      z_loss: adds z_loss * lse**2 for every non-ignored row (reduced like the loss);
        return_z_loss=True also returns that term alone (no gradient; for logging).
      softcap: logits become softcap * tanh(logit_scale * x / softcap); -inf logits stay -inf.
      logit_scale: logits are multiplied by it first.
      return_lse: also returns the per-row log-sum-exp (float32, float64 for float64 input;
        shape of the target for class indices), not differentiable.
      inplace_backward: the gradient is written into the logits' storage during the forward,
        so forward + backward need no buffer the size of the logits besides the logits: the
        logits are clobbered (read them before, never after).  Refused for a leaf that
        requires grad and for non-contiguous logits; another autograd use of the same logits
        fails loudly at its backward.
    Returns the loss, or (loss, z_loss term?, lse?) in that order when asked for.
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
    if _is_dtensor(input):
        # Logits sharded on the class dimension: the vocab-parallel path (xent_ext.distributed).
        from .distributed import _dtensor

        return _dtensor.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
            return_z_loss=return_z_loss, softcap=softcap, logit_scale=logit_scale,
            return_lse=return_lse, inplace_backward=inplace_backward)
    red = _check_options(input, target, weight, reduction, label_smoothing, z_loss, softcap,
                         logit_scale)
    prob = _check_target(input, target, ignore_index)

    # (N, C, S) view: S = 1 for (N, C), the product of d1..dk for K-dim inputs; the no-batch
    # (C,) case is a batch of one.
    if input.dim() == 1:
        x3 = input.reshape(1, -1, 1)
        row_shape: tuple[int, ...] = ()
    else:
        n, c = input.shape[0], input.shape[1]
        row_shape = (n,) + tuple(input.shape[2:])
        x3 = input.reshape(n, c, math.prod(input.shape[2:]))
    if prob:
        t3 = target.reshape(x3.shape)
    else:
        t3 = target.reshape(x3.shape[0], x3.shape[2]).long()

    if prob:
        # torch computes in the promoted dtype (float32 logits, float64 targets or weight ->
        # float64).
        common = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            common = torch.promote_types(common, weight.dtype)
        x3, t3 = x3.to(common), t3.to(common)
        weight = weight.to(common) if weight is not None else None
    if _autocast_to_float32(x3):
        # The loss then comes out in float32 and a float32 weight is accepted.  The kernels
        # accumulate in float32 anyway; the cast makes the result dtypes and the rules torch's.
        x3 = x3.float()
        t3 = t3.float() if prob else t3
        weight = weight.float() if weight is not None else None

    compute_grad = torch.is_grad_enabled() and x3.requires_grad
    options = (red, ignore_index, float(label_smoothing), float(logit_scale),
               float(softcap or 0.0), float(z_loss))
    if _needs_composite(x3, t3):
        # torch.func transforms and forward-mode AD: the same loss in ATen operations, which
        # carry their own vmap rules and forward derivatives.
        if inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True cannot be used under "
                               "torch.func transforms or forward-mode AD")
        loss, lse = _composite.cross_entropy(x3, t3, weight, *options)
    elif inplace_backward and compute_grad:
        _check_inplace(input, x3)
        loss, lse = _ops.InplaceCrossEntropy.apply(x3, t3, weight, *options)
    elif torch.compiler.is_compiling():
        loss, lse, _ = _ops.fwd(x3, t3, weight, *options, compute_grad)
    else:
        loss, lse, _ = _ops.fwd_eager(x3, t3, weight, *options, compute_grad)
    if red == _ops._REDUCTION_NONE:
        loss = loss.reshape(row_shape)
    elif (input.dim() == 1 and input.is_cuda and not prob and red == _ops._REDUCTION_MEAN
          and label_smoothing == 0):
        # One (C,) sample whose target is ignored: torch's CUDA kernel returns 0 there, its
        # CPU kernel 0 / 0 = NaN (as for a batch whose targets are all ignored).  Follow the
        # device; a select on the device, not a host-side test.
        loss = torch.where(t3.reshape(()) == ignore_index, loss.new_zeros(()), loss)
    if not (return_z_loss or return_lse):
        return loss
    out = [loss]
    if return_z_loss:
        out.append(_z_loss_term(lse, t3, weight, prob, red, ignore_index, z_loss, row_shape,
                                input.dtype))
    if return_lse:
        out.append(lse.reshape(row_shape))
    return tuple(out)


def _is_dtensor(t: Tensor) -> bool:
    """A DTensor, without importing torch.distributed for plain tensors."""
    if type(t) is Tensor:  # the common case, decided at once
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _dtensor_type():
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _needs_composite(*tensors: Tensor | None) -> bool:
    """True under torch.func transforms (grad, vmap, jacrev, hessian, ...) and when one of
    `tensors` (logits, probability targets; a linear layer's input and parameters) carries a
    forward-mode tangent (dual tensors)."""
    if torch.compiler.is_compiling():
        return False  # what the compiled graph sees; torch.func over torch.compile is its own
    if torch._C._are_functorch_transforms_active():
        return True
    if _fwAD._current_level < 0:
        return False
    return any(t is not None and _fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _check_inplace(input: Tensor, x3: Tensor) -> None:
    if torch.compiler.is_compiling():
        # A compiled graph may save these logits for another node's backward (or reuse their
        # buffer) without the version check that makes eager mode fail loudly: the gradient
        # could come out wrong, silently.
        raise RuntimeError("cross_entropy: inplace_backward=True is not supported under "
                           "torch.compile (the compiled graph cannot check that nothing else "
                           "needs the overwritten logits); turn it off there")
    if input.is_leaf and input.requires_grad:
        raise RuntimeError("cross_entropy: inplace_backward=True would overwrite a leaf tensor "
                           "that requires grad; pass the output of a layer, or turn it off")
    base = input._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError("cross_entropy: inplace_backward=True would overwrite a view of a "
                           "leaf tensor that requires grad (torch refuses in-place operations "
                           "on such views); pass the output of a layer, or turn it off")
    if not input.is_contiguous():  # then x3 is a view of it, not a copy
        raise RuntimeError("cross_entropy: inplace_backward=True needs contiguous logits "
                           "(the gradient is written over them)")


def _z_loss_term(lse: Tensor, t3: Tensor, weight: Tensor | None, prob: bool, red: int,
                 ignore_index: int, z_loss: float, row_shape: tuple[int, ...],
                 dtype: torch.dtype) -> Tensor:
    """The z-loss part of the loss alone, reduced like the loss (for logging)."""
    lse = lse.detach()
    rows = z_loss * lse * lse
    if prob:
        divisor = lse.new_tensor(float(lse.numel()))
    else:
        valid = t3 != ignore_index
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        if weight is None:
            divisor = valid.sum().to(lse.dtype)
        else:
            c = weight.numel()
            w_t = weight.to(lse.dtype)[t3.clamp(0, max(c - 1, 0))]
            divisor = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
    if red == _ops._REDUCTION_NONE:
        return rows.reshape(row_shape).to(dtype)
    if red == _ops._REDUCTION_SUM:
        return rows.sum().to(dtype)
    return (rows.sum() / divisor).to(dtype)
