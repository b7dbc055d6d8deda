"""Fake kernels and autograd for the C++ operators (schemas live in csrc/ops.cpp).

The forward op already computed the gradient of the reduced loss for an incoming gradient of 1.
Every backward is exact, for any incoming gradient and under any saved-tensor hook:

- the first backward scales that buffer in place by the incoming gradient and hands it on, which
  costs nothing when the incoming gradient is exactly 1 (decided inside the kernel, with no host
  synchronisation).  It hands on a tensor with a version counter of its own (`.data`), so that
  what the caller then does to it (`.grad` accumulation, `mul_`, `zero_`) never trips the saved
  buffer's version check;
- a later backward through the same graph (retain_graph=True, gradcheck, jacobian) cannot trust
  the buffer any more (scaled, or handed out and modified): it runs the forward kernel again on
  the saved logits for a fresh gradient;
- a backward that builds a graph (create_graph=True: double backward, gradient penalties,
  Hessian-vector products), or whose incoming gradient is batched (vmap over the backward),
  differentiates the same loss written with ATen operations (_composite.py) on the saved inputs.

The logits are saved (a reference, no copy): the forward holds them and the gradient together
anyway, so the peak memory of a training step does not change; saved-tensor hooks (activation
checkpointing, save_on_cpu) see them and the gradient buffer like any saved tensor.
"""

import torch

from . import (
    _C,  # noqa: F401  (loads the library that defines the operators)
    _composite,
)

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
    ctx.options = inputs[3:9]  # reduction .. z_loss, as the op takes them
    ctx.prob_target_grad = target.is_floating_point() and target.requires_grad
    ctx.has_weight = weight is not None
    ctx.backward_runs = 0
    ctx.save_for_backward(grad, input, target, weight if weight is not None else lse.new_empty(0))


def _later_grad(ctx, input, target, weight, grad_loss):
    """The gradient for a backward after the first: the forward kernel again on the saved
    logits, scaled out of place."""
    with torch._C._AutoDispatchBelowAutograd():
        _, _, grad = fwd(input.detach(), target.detach(), weight, *ctx.options, True)
    scale_grad_(grad, grad_loss)
    return grad


def _composite_grads(ctx, input, target, weight, grad_loss):
    """Gradients of the loss written with ATen operations (_composite.py), as a graph of the
    saved inputs when one is being built (create_graph=True), and for batched incoming
    gradients (vmap over the backward)."""
    wrt = [t for t, need in ((input, ctx.needs_input_grad[0]),
                             (target, ctx.needs_input_grad[1] and ctx.prob_target_grad)) if need]
    if not wrt:
        return None, None
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        loss, _ = _composite.cross_entropy(input, target, weight, *ctx.options)
        grads = torch.autograd.grad(loss, wrt, grad_loss, create_graph=create_graph,
                                    allow_unused=True)
    grads = list(grads)
    grad_input = grads.pop(0) if ctx.needs_input_grad[0] else None
    grad_target = grads.pop(0) if grads else None
    return grad_input, grad_target


def _target_grad(ctx, input, target, weight, grad_loss):
    """d loss / d q for probability targets: -(1 - eps) w_j log_softmax_j (times the incoming
    gradient, over N * S for 'mean')."""
    reduction, _ii, label_smoothing, logit_scale, softcap, _z = ctx.options
    n, c, s = input.shape
    y = _composite.transformed(input.detach().to(acc_dtype(input.dtype)), logit_scale, softcap)
    g = -(1.0 - label_smoothing) * torch.log_softmax(y, dim=1)
    if ctx.has_weight:
        g = g * weight.to(g.dtype).view(1, c, 1)
    if reduction == _REDUCTION_NONE:
        g = g * grad_loss.to(g.dtype).view(n, 1, s)
    else:
        g = g * grad_loss.to(g.dtype)
        if reduction == _REDUCTION_MEAN:
            g = g / (n * s)
    return g.to(target.dtype)


def _is_batched(t: torch.Tensor) -> bool:
    """An incoming gradient under vmap (torch.func's, or the legacy one gradcheck's batched
    checks use): the kernels have no batching rule, ATen operations do."""
    f = torch._C._functorch
    return f.is_functorch_wrapped_tensor(t) or f.is_legacy_batchedtensor(t)


def _backward(ctx, grad_loss, _grad_lse, _grad_grad):
    if grad_loss is None:  # nothing flows back through the loss
        return (None,) * 10
    grad, input, target, weight = ctx.saved_tensors
    weight = weight if ctx.has_weight else None
    if ctx.needs_input_grad[0] and not ctx.compute_grad:
        raise RuntimeError(
            "xent_ext: the forward ran without computing the gradient (input did not require "
            "grad when the loss was computed)")
    if torch.is_grad_enabled() or _is_batched(grad_loss):
        grad_input, grad_target = _composite_grads(ctx, input, target, weight, grad_loss)
        return (grad_input, grad_target) + (None,) * 8
    grad_input = grad_target = None
    ctx.backward_runs += 1
    if ctx.needs_input_grad[0]:
        if ctx.backward_runs == 1:
            if not torch.compiler.is_compiling():
                grad = grad.data  # a version counter of its own (see the module comment)
            scale_grad_(grad, grad_loss)
            grad_input = grad
        else:
            grad_input = _later_grad(ctx, input, target, weight, grad_loss)
    if ctx.needs_input_grad[1] and ctx.prob_target_grad:
        grad_target = _target_grad(ctx, input, target, weight, grad_loss)
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
    N x C buffer besides the logits themselves, which are clobbered: nothing is left to compute
    a second gradient from, so a second backward, or one that builds a graph, raises."""

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
        ctx.backward_runs = 0
        ctx.save_for_backward(inputs[0])  # holds the gradient now

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if grad_loss is None:
            return (None,) * 9
        if torch.is_grad_enabled():
            raise RuntimeError(
                "xent_ext.cross_entropy(inplace_backward=True): a backward that builds a graph "
                "(create_graph=True, double backward) needs the logits, which the forward "
                "overwrote with their gradient; use inplace_backward=False")
        ctx.backward_runs += 1
        if ctx.backward_runs > 1:
            raise RuntimeError(
                "xent_ext.cross_entropy(inplace_backward=True): a second backward through the "
                "same graph needs the logits, which the forward overwrote with their gradient; "
                "use inplace_backward=False")
        (grad,) = ctx.saved_tensors
        grad = grad.detach()
        if not torch.compiler.is_compiling():
            if _is_batched(grad_loss):  # vmap over the backward: out of place
                return (_scaled(grad, grad_loss),) + (None,) * 8
            grad = grad.data  # a version counter of its own (see the module comment)
        scale_grad_(grad, grad_loss)
        return (grad,) + (None,) * 8


def _scaled(grad, grad_loss):
    """grad * grad_loss out of place: one factor, or one per row (N, S) -> (N, 1, S)."""
    if grad_loss.dim() > 0:
        grad_loss = grad_loss.reshape(grad.shape[0], 1, grad.shape[2])
    return (grad.to(acc_dtype(grad.dtype)) * grad_loss).to(grad.dtype)
