"""Every autograd mode PyTorch supports for cross_entropy, against PyTorch itself:

- PyTorch's own OpInfo (nn.functional.cross_entropy) and ModuleInfo (nn.CrossEntropyLoss) samples
  through the checks its test_ops / test_modules run: gradcheck (not fast mode), gradgradcheck,
  forward-mode AD, forward-over-reverse, batched gradients (vmap over the backward);
- higher order: Hessians, Hessian-vector products through a parameter upstream of the logits,
  gradient penalties with create_graph=True, torch.func grad / hessian / jacrev / vmap / jvp;
- repeated backward through a retained graph, for any incoming gradient (zeros included), under
  saved-tensor hooks (save_on_cpu) and non-reentrant checkpointing, with the logits' .grad
  accumulated or modified in place between passes.
Nothing may come out as a silent zero: each result is compared with torch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.checkpoint import checkpoint

import xent_ext

common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

OPINFO = next(o for o in common_methods.op_db if o.name == "nn.functional.cross_entropy")
MODULEINFO = next(m for m in common_modules.module_db
                  if m.module_cls is torch.nn.CrossEntropyLoss)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _samples(device):
    return list(OPINFO.sample_inputs(device, torch.float64, requires_grad=True))


def _sample_fn(sample, impl=xent_ext.cross_entropy):
    return lambda *args: impl(*args, **sample.kwargs)


def _sample_id(i):
    return f"s{i}"


@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_samples_match_torch(device):
    for sample in _samples(device):
        args = (sample.input, *sample.args)
        ours = _sample_fn(sample)(*args)
        ref = _sample_fn(sample, F.cross_entropy)(*args)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(_samples("cpu"))), ids=_sample_id)
def test_opinfo_grad_and_gradgrad(device, index):
    """test_ops' test_fn_grad, test_forward_mode_AD, test_fn_gradgrad and test_fn_fwgrad_bwgrad
    with the OpInfo's own flags."""
    sample = _samples(device)[index]
    args = (sample.input, *sample.args)
    fn = _sample_fn(sample)
    op = OPINFO
    assert gradcheck(fn, args, check_batched_grad=op.check_batched_grad, check_grad_dtypes=True,
                     check_undefined_grad=True, fast_mode=False)
    assert gradcheck(fn, args, check_forward_ad=op.supports_forward_ad, check_backward_ad=False,
                     check_undefined_grad=False, check_batched_grad=False,
                     check_batched_forward_grad=op.check_batched_forward_grad)
    for non_contig in (False, True):
        assert gradgradcheck(fn, args, gen_non_contig_grad_outputs=non_contig,
                             check_batched_grad=op.check_batched_gradgrad, check_grad_dtypes=True)
    assert gradgradcheck(fn, args, check_fwd_over_rev=op.supports_fwgrad_bwgrad,
                         check_rev_over_rev=False, check_undefined_grad=False)


def _module_inputs(device):
    return list(MODULEINFO.module_inputs_func(MODULEINFO, device=device, dtype=torch.float64,
                                              requires_grad=True, training=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(_module_inputs("cpu"))), ids=_sample_id)
def test_moduleinfo_grad_and_gradgrad(device, index):
    """test_modules' test_grad / test_gradgrad for xent_ext.CrossEntropyLoss, and the same
    values as nn.CrossEntropyLoss."""
    mi = _module_inputs(device)[index]
    ours = xent_ext.CrossEntropyLoss(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    ref = torch.nn.CrossEntropyLoss(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    args = mi.forward_input.args
    torch.testing.assert_close(ours(*args), ref(*args), rtol=1e-12, atol=1e-12)
    diff = [a for a in args if torch.is_tensor(a) and a.requires_grad]

    def fn(*d):
        it = iter(d)
        return ours(*[next(it) if torch.is_tensor(a) and a.requires_grad else a for a in args])

    # Full Jacobians for the small inputs; the randomised (fast) check for the larger ones,
    # whose full Jacobians take seconds each.
    fast = sum(d.numel() for d in diff) > 64
    assert gradcheck(fn, diff, check_batched_grad=True, fast_mode=fast)
    assert gradgradcheck(fn, diff, check_batched_grad=True, check_fwd_over_rev=True,
                         fast_mode=fast)


# ---- higher order and torch.func --------------------------------------------------------------
def _batch(n=4, c=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * 2
    t = torch.randint(0, c, (n,), generator=g)
    t[0] = -100
    return x, t


OPTIONS = [dict(), dict(label_smoothing=0.2, reduction="sum"),
           dict(weight=torch.rand(7, dtype=torch.float64) + 0.5, reduction="none")]


@pytest.mark.parametrize("kw", OPTIONS, ids=["mean", "smooth-sum", "weight-none"])
def test_hessian_is_torchs(kw):
    x, t = _batch()

    def f(impl):
        return lambda x: impl(x, t, **kw).sum()

    h = torch.autograd.functional.hessian(f(xent_ext.cross_entropy), x)
    ref = torch.autograd.functional.hessian(f(F.cross_entropy), x)
    assert h.abs().max() > 1e-3  # not a silent zero
    torch.testing.assert_close(h, ref)
    torch.testing.assert_close(torch.func.hessian(f(xent_ext.cross_entropy))(x), ref)


@pytest.mark.parametrize("kw", OPTIONS, ids=["mean", "smooth-sum", "weight-none"])
def test_hessian_vector_product_through_an_upstream_parameter(kw):
    """Logits = h @ W: the HVP with respect to W needs the backward of the loss's backward."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64)
    _, t = _batch()
    results = []
    for impl in (xent_ext.cross_entropy, F.cross_entropy):
        w = torch.randn(5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                        requires_grad=True)
        loss = impl(h @ w, t, **kw).sum()
        (gw,) = torch.autograd.grad(loss, w, create_graph=True)
        (hvp,) = torch.autograd.grad((gw * v).sum(), w)
        results.append((gw.detach(), hvp))
    torch.testing.assert_close(results[0], results[1])
    assert results[0][1].abs().max() > 1e-3


def test_gradient_penalty_keeps_its_second_term():
    """loss + |d loss / d x|^2 with create_graph=True: the penalty's gradient must flow."""
    x, t = _batch()
    grads = []
    for impl in (xent_ext.cross_entropy, F.cross_entropy):
        xr = x.clone().requires_grad_()
        loss = impl(xr * 1.5, t)
        (g,) = torch.autograd.grad(loss, xr, create_graph=True)
        (loss + g.pow(2).sum() * 10).backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_torch_func_transforms():
    x, t = _batch()
    for fn in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(fn(lambda x: xent_ext.cross_entropy(x, t))(x),
                                   fn(lambda x: F.cross_entropy(x, t))(x))
    xb = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda x: xent_ext.cross_entropy(x, t))(xb),
                               torch.func.vmap(lambda x: F.cross_entropy(x, t))(xb))
    tangent = torch.randn_like(x)
    ours = torch.func.jvp(lambda x: xent_ext.cross_entropy(x, t, reduction="none"), (x,),
                          (tangent,))
    ref = torch.func.jvp(lambda x: F.cross_entropy(x, t, reduction="none"), (x,), (tangent,))
    torch.testing.assert_close(ours, ref)
    assert ours[1].abs().max() > 1e-3


def test_forward_mode_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    x, t = _batch()
    tangent = torch.randn_like(x)
    out = []
    for impl in (xent_ext.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            loss = impl(fwAD.make_dual(x, tangent), t, label_smoothing=0.1)
            out.append(fwAD.unpack_dual(loss))
    assert out[0].tangent is not None
    torch.testing.assert_close(tuple(out[0]), tuple(out[1]))


def test_inplace_backward_refuses_what_it_cannot_do():
    x, t = _batch()
    w = torch.randn(7, 7, dtype=torch.float64, requires_grad=True)
    loss = xent_ext.cross_entropy(x @ w, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, w, create_graph=True)
    loss = xent_ext.cross_entropy(x @ w, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda w: xent_ext.cross_entropy(x @ w, t, inplace_backward=True))(w)


# ---- repeated backward ------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _two_backwards(impl, x, t, first, second, **kw):
    xr = x.clone().requires_grad_()
    loss = impl(xr, t, **kw)
    (g1,) = torch.autograd.grad(loss, xr, first, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xr, second)
    return g1, g2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_second_backward_after_a_zero_incoming_gradient(dtype):
    x, t = _batch(dtype=dtype)
    first = torch.tensor([0.0, 1.0, 0.0, 2.0], dtype=dtype)
    second = torch.tensor([1.0, 0.5, 3.0, 1.0], dtype=dtype)
    ours = _two_backwards(xent_ext.cross_entropy, x, t, first, second, reduction="none")
    ref = _two_backwards(F.cross_entropy, x, t, first, second, reduction="none")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ours, ref, **tol)
    assert bool(torch.isfinite(ours[1]).all())


def test_jacobian_and_full_gradcheck_of_unreduced_loss():
    x, t = _batch()
    jac = torch.autograd.functional.jacobian(
        lambda x: xent_ext.cross_entropy(x, t, reduction="none"), x)
    ref = torch.autograd.functional.jacobian(lambda x: F.cross_entropy(x, t, reduction="none"), x)
    torch.testing.assert_close(jac, ref)
    xr = x.clone().requires_grad_()
    assert gradcheck(lambda x: xent_ext.cross_entropy(x, t, reduction="none"), (xr,),
                     fast_mode=False)


def _scaled_twice(impl, x, t, hook_ctx):
    """The 0.75-instead-of-1.5 case: a retained graph backwarded twice under a saved-tensor
    hook, the second time with another incoming gradient."""
    xr = x.clone().requires_grad_()
    with hook_ctx():
        loss = impl(xr * 1.0, t)
    loss.backward(torch.tensor(0.5, dtype=x.dtype), retain_graph=True)
    g1 = xr.grad.clone()
    loss.backward(torch.tensor(1.0, dtype=x.dtype))
    return g1, xr.grad


@pytest.mark.parametrize("hooks", ["save_on_cpu", "clone_on_unpack"])
def test_saved_tensor_hooks_do_not_change_the_result(hooks):
    x, t = _batch(dtype=torch.float32)
    if hooks == "save_on_cpu":
        def ctx():
            return torch.autograd.graph.save_on_cpu()
    else:
        def ctx():
            return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.clone())
    ours = _scaled_twice(xent_ext.cross_entropy, x, t, ctx)
    ref = _scaled_twice(F.cross_entropy, x, t, ctx)
    torch.testing.assert_close(ours, ref)


def test_non_reentrant_checkpoint_backward_twice():
    x, t = _batch(dtype=torch.float32)
    out = []
    for impl in (xent_ext.cross_entropy, F.cross_entropy):
        xr = x.clone().requires_grad_()
        loss = checkpoint(lambda x, impl=impl: impl(x * 2.0, t), xr, use_reentrant=False)
        loss.backward(torch.tensor(0.5), retain_graph=True)
        g1 = xr.grad.clone()
        loss.backward(torch.tensor(1.0))
        out.append((g1, xr.grad.clone()))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_three_backwards_and_grad_modified_in_between(dtype):
    """Accumulating into the logits' .grad three times, with .grad scaled and zeroed in between
    (what gradient clipping and optimizers do): the saved buffer handed out as .grad must not
    trip a version check or be read back as a gradient."""
    x, t = _batch(dtype=dtype)
    out = []
    for impl in (xent_ext.cross_entropy, F.cross_entropy):
        xr = x.clone().requires_grad_()
        loss = impl(xr, t, label_smoothing=0.1)
        grads = []
        loss.backward(retain_graph=True)
        grads.append(xr.grad.clone())
        xr.grad.mul_(0.5)
        loss.backward(retain_graph=True)
        grads.append(xr.grad.clone())
        xr.grad.zero_()
        loss.backward(torch.tensor(2.0, dtype=dtype), retain_graph=True)
        grads.append(xr.grad.clone())
        loss.backward()
        grads.append(xr.grad.clone())
        out.append(grads)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out[0], out[1], **tol)
