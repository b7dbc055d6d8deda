"""Smaller corners of PyTorch's semantics where a drop-in must behave as torch does (or refuse
clearly): in-place gradients on views and under torch.compile, dynamic shapes, autocast,
deprecated and promoted arguments, nested patching, environment variables, TorchScript, the
order of argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import xent_ext


def test_inplace_backward_refuses_a_view_of_a_leaf():
    leaf = torch.randn(4, 10, requires_grad=True)
    t = torch.randint(0, 10, (2,))
    for view in (leaf[:2], leaf.view(2, 20)[:, :10], leaf.reshape(4, 10)):
        tt = t if view.shape[0] == 2 else torch.randint(0, 10, (4,))
        with pytest.raises(RuntimeError, match="view of a leaf"):
            xent_ext.cross_entropy(view, tt, inplace_backward=True)
    before = leaf.detach().clone()
    assert torch.equal(leaf.detach(), before)  # nothing was overwritten


def _saved_before(ce, x, w, t):
    logits = x @ w
    penalty = logits.pow(2).sum() * 0.01  # saves the logits before the loss clobbers them
    return ce(logits, t) + penalty


def test_inplace_backward_under_torch_compile_is_refused_or_checked():
    """A compiled graph cannot see that another node saved the logits: fullgraph=True refuses;
    without fullgraph the call runs eagerly, where the version check fails loudly."""
    torch._dynamo.reset()
    x, t = torch.randn(4, 6), torch.randint(0, 10, (4,))

    def ce(logits, t):
        return xent_ext.cross_entropy(logits, t, inplace_backward=True)

    w = torch.randn(6, 10, requires_grad=True)
    with pytest.raises(Exception, match="not supported under torch.compile"):
        torch.compile(_saved_before, fullgraph=True)(ce, x, w, t)
    torch._dynamo.reset()
    loss = torch.compile(_saved_before)(ce, x, w, t)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1),
                                dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0,
                                     logit_scale=0.5, reduction="none")],
                         ids=["smoothing", "every-option"])
def test_compile_dynamic_shapes(kw):
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: xent_ext.cross_entropy(x, t, **kw), fullgraph=True,
                      dynamic=True)
    for n in (4, 7, 9):
        x = torch.randn(n, 6, requires_grad=True)
        t = torch.randint(0, 6, (n,))
        loss = f(x, t)
        loss.sum().backward()
        ref_x = x.detach().clone().requires_grad_()
        ref = xent_ext.cross_entropy(ref_x, t, **kw)
        ref.sum().backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_cpu_computes_in_float32_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g).to(dtype)
    t = torch.randint(0, 9, (5,), generator=g)
    w = torch.rand(9, generator=g) + 0.5
    q = torch.softmax(torch.randn(5, 9, generator=g), 1)
    for args, kw in (((t,), {}), ((t,), {"weight": w}), ((q,), {"label_smoothing": 0.1})):
        out = []
        for impl in (xent_ext.cross_entropy, F.cross_entropy):
            xr = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype):
                loss = impl(xr, *args, **kw)
            loss.backward()
            out.append((loss, xr.grad))
        assert out[0][0].dtype == out[1][0].dtype == torch.float32
        assert out[0][1].dtype == dtype
        torch.testing.assert_close(out[0], out[1])


def test_deprecated_and_invalid_reductions():
    x, t = torch.randn(3, 5), torch.tensor([1, 2, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = xent_ext.cross_entropy(x, t, reduction="elementwise_mean")
    assert any("elementwise_mean" in str(w.message) for w in caught)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        xent_ext.cross_entropy(x, t, reduction="avg")


def test_probability_targets_promote_with_the_weight():
    x = torch.randn(3, 5)
    q = torch.softmax(torch.randn(3, 5), 1)
    for w in (torch.rand(5, dtype=torch.float64), torch.rand(5).half()):
        ours, ref = xent_ext.cross_entropy(x, q, weight=w), F.cross_entropy(x, q, weight=w)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref)
    with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
        xent_ext.cross_entropy(x, torch.tensor([1, 2, 3]), weight=torch.rand(5).double())


def test_batch_size_is_checked_before_the_target_dtype():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"batch_size \(3\) to match target batch_size \(2\)"):
        xent_ext.cross_entropy(x, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="Long or Byte, but got Int"):
        xent_ext.cross_entropy(x, torch.tensor([1, 2, 3], dtype=torch.int32))


def test_nested_patches_keep_the_outer_one():
    original = F.cross_entropy
    with xent_ext.patch():
        with xent_ext.patch():
            assert xent_ext.is_patched()
        assert xent_ext.is_patched()
        assert F.cross_entropy is not original
    assert F.cross_entropy is original and not xent_ext.is_patched()


@pytest.mark.parametrize("var, value, message", [
    ("XENT_CPU_CACHE_MB", "abc", "XENT_CPU_CACHE_MB must be a whole number"),
    ("XENT_CPU_CACHE_MB", "-5", "XENT_CPU_CACHE_MB must be a whole number"),
    ("XENT_CPU_ISA", "avx9000", "XENT_CPU_ISA: unknown instruction set 'avx9000'"),
])
def test_bad_environment_variables_are_named(var, value, message):
    code = ("import torch, xent_ext\n"
            "x = torch.randn(2048, 2048, requires_grad=True)\n"
            "xent_ext.cross_entropy(x, torch.randint(0, 2048, (2048,))).backward()\n")
    env = dict(os.environ, **{var: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]


def test_torchscript_module_matches_torchs():
    x = torch.randn(4, 7, 3)
    t = torch.randint(0, 7, (4, 3))
    for kw in ({}, {"label_smoothing": 0.1, "reduction": "none"},
               {"weight": torch.rand(7) + 0.5, "ignore_index": 2}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            ours = torch.jit.script(xent_ext.CrossEntropyLoss(**kw))
            ref = torch.jit.script(torch.nn.CrossEntropyLoss(**kw))
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        lo, lr = ours(xo, t), ref(xr, t)
        lo.sum().backward()
        lr.sum().backward()
        torch.testing.assert_close(lo, lr)
        torch.testing.assert_close(xo.grad, xr.grad)
