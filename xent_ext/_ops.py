"""Fake kernels and autograd for the C++ operators (schemas live in csrc/ops.cpp).

The forward op already computed the gradient of the reduced loss for an incoming gradient of
1; the first backward only scales that buffer in place by the incoming gradient and returns it,
which costs nothing when the incoming gradient is exactly 1 (decided inside the kernel, with no
host synchronisation).  A later backward through the same graph (retain_graph=True, gradcheck)
must neither scale the buffer twice nor change the tensor handed out the first time: it
returns a new tensor, buffer * (new scale / first scale).  Rows whose first incoming gradient
was exactly 0 cannot be recovered that way; they come out as NaN (loud), never as a silently
wrong value.
"""

import torch

from . import _C  # noqa: F401  (loads the library that defines the operators)

_REDUCTION_NONE, _REDUCTION_MEAN, _REDUCTION_SUM = 0, 1, 2

fwd = torch.ops.xent_ext.cross_entropy_fwd
fwd_inplace_ = torch.ops.xent_ext.cross_entropy_fwd_inplace_
scale_grad_ = torch.ops.xent_ext.scale_grad_


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("xent_ext::cross_entropy_fwd")
def _fwd_fake(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale,
              softcap, z_loss, compute_grad):
    n, _, s = input.shape
    loss = input.new_empty((n, s) if reduction == _REDUCTION_NONE else ())
    lse = input.new_empty((n, s), dtype=acc_dtype(input.dtype))
    grad = (torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad
            else input.new_empty((0,)))
    return loss, lse, grad


@torch.library.register_fake("xent_ext::cross_entropy_fwd_inplace_")
def _fwd_inplace_fake(input, target, weight, reduction, ignore_index, label_smoothing,
                      logit_scale, softcap, z_loss):
    loss, lse, _ = _fwd_fake(input, target, weight, reduction, ignore_index, label_smoothing,
                             logit_scale, softcap, z_loss, False)
    return loss, lse


@torch.library.register_fake("xent_ext::scale_grad_")
def _scale_grad_fake(grad, scale):
    return None


def _setup_context(ctx, inputs, output):
    (input, target, weight, reduction, _ii, label_smoothing, logit_scale, softcap, _z,
     compute_grad) = inputs
    _, lse, grad = output
    # lse and the gradient buffer are not differentiable outputs: without this, autograd would
    # fill an N x C tensor of zeros as their incoming gradient on every backward.
    ctx.mark_non_differentiable(lse, grad)
    ctx.set_materialize_grads(False)
    ctx.compute_grad = compute_grad
    ctx.reduction = reduction
    ctx.label_smoothing = label_smoothing
    ctx.logit_scale = logit_scale
    ctx.softcap = softcap
    ctx.prob_target_grad = target.is_floating_point() and target.requires_grad
    saved = [grad]
    if ctx.prob_target_grad:  # d loss / d q needs log_softmax, rebuilt from input and lse
        saved += [input, lse, weight if weight is not None else input.new_empty(0)]
    ctx.has_weight = weight is not None
    ctx.first_scale = None  # the incoming gradient the buffer was scaled by, once used
    ctx.save_for_backward(*saved)


def _scaled_saved_grad(ctx, grad, grad_loss):
    """The saved gradient times the incoming gradient: in place the first time (free when the
    incoming gradient is exactly 1), as a new tensor after that."""
    if ctx.first_scale is None:
        scale_grad_(grad, grad_loss)
        ctx.first_scale = grad_loss.detach()
        return grad
    return _rescaled(grad, grad_loss, ctx.first_scale)


def _rescaled(grad, new_scale, first_scale):
    """A later backward: the buffer holds gradient * first_scale.  A first scale of 0 cannot be
    undone; the division then yields NaN rather than a silently wrong zero."""
    acc = acc_dtype(grad.dtype)
    factor = new_scale.to(acc) / first_scale.to(acc)
    if factor.dim() > 0:  # per-row ('none'): (N, S) -> (N, 1, S)
        factor = factor.reshape(grad.shape[0], 1, grad.shape[2])
    return (grad.to(acc) * factor).to(grad.dtype)


def _transformed(input, logit_scale, softcap):
    y = input.to(acc_dtype(input.dtype)) * logit_scale
    if softcap > 0:
        y = torch.where(torch.isneginf(input), input.to(y.dtype), softcap * torch.tanh(y / softcap))
    return y


def _backward(ctx, grad_loss, _grad_lse, _grad_grad):
    saved = ctx.saved_tensors
    grad_input = grad_target = None
    if grad_loss is None:  # nothing flows back through the loss
        return (None,) * 10
    if ctx.needs_input_grad[0]:
        if not ctx.compute_grad:
            raise RuntimeError(
                "xent_ext: the forward ran without computing the gradient (input did not "
                "require grad when the loss was computed)")
        grad_input = _scaled_saved_grad(ctx, saved[0], grad_loss)
    if ctx.needs_input_grad[1] and ctx.prob_target_grad:
        _, input, lse, weight = saved
        n, c, s = input.shape
        log_p = _transformed(input, ctx.logit_scale, ctx.softcap) - lse.unsqueeze(1)
        g = -(1.0 - ctx.label_smoothing) * log_p
        if ctx.has_weight:
            g = g * weight.to(g.dtype).view(1, c, 1)
        if ctx.reduction == _REDUCTION_NONE:
            g = g * grad_loss.to(g.dtype).view(n, 1, s)
        else:
            g = g * grad_loss.to(g.dtype)
            if ctx.reduction == _REDUCTION_MEAN:
                g = g / (n * s)
        grad_target = g.to(input.dtype)
    return grad_input, grad_target, None, None, None, None, None, None, None, None


torch.library.register_autograd("xent_ext::cross_entropy_fwd", _backward,
                                setup_context=_setup_context)


class CrossEntropy(torch.autograd.Function):
    """cross_entropy_fwd with the same autograd as registered above, for eager calls.

    The registered autograd (what torch.compile traces) goes through a generic wrapper that
    rebuilds the schema's arguments in Python on every call, which costs more than the whole
    forward of a small batch; this Function calls the kernel directly, below the autograd
    dispatch key, and shares _setup_context and _backward with it."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def fwd_eager(*inputs):
    """cross_entropy_fwd outside torch.compile: through CrossEntropy when a gradient may flow
    back, else straight to the kernel."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in inputs[:3]):
        return CrossEntropy.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return fwd(*inputs)


class InplaceCrossEntropy(torch.autograd.Function):
    """The forward writes the gradient over the logits (cross_entropy_fwd_inplace_); the
    backward scales that storage in place and hands it on.  Forward + backward then need no
    N x C buffer besides the logits themselves, which are clobbered."""

    @staticmethod
    def forward(input, target, weight, reduction, ignore_index, label_smoothing, logit_scale,
                softcap, z_loss):
        loss, lse = fwd_inplace_(input, target, weight, reduction, ignore_index,
                                 label_smoothing, logit_scale, softcap, z_loss)
        if not torch.compiler.is_compiling():
            # Any other autograd node that saved these logits now fails loudly at its backward
            # ("modified by an inplace operation") instead of reading gradients as logits.
            torch.autograd.graph.increment_version(input)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.first_scale = None
        ctx.save_for_backward(inputs[0])  # holds the gradient now

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if grad_loss is None:
            return (None,) * 9
        (grad,) = ctx.saved_tensors
        grad_input = _scaled_saved_grad(ctx, grad.detach(), grad_loss)
        return (grad_input,) + (None,) * 8
