"""patch() at every call site of PyTorch's cross entropy, patch(**options), nesting, threads.

Which implementation ran is read from the autograd node: xent_ext's is CrossEntropyBackward,
torch's NllLossBackward0 (or its label-smoothing composite)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Bound before any patch, as a module imported before patching would hold it.
from torch.nn.functional import cross_entropy as early_bound_cross_entropy

import xent_ext

OURS = "CrossEntropyBackward"


def _data(n=6, c=11, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    t[0] = -100
    return x, t


def _grad_of(fn, x, t):
    x = x.clone().requires_grad_()
    loss = fn(x, t)
    node = type(loss.grad_fn).__name__
    loss.backward()
    return loss.detach(), x.grad, node


def _scripted(x, t):
    return torch.nn.functional.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.1)


_SCRIPTED = None


def _script():
    global _SCRIPTED
    if _SCRIPTED is None:
        with pytest.warns(FutureWarning):
            _SCRIPTED = torch.jit.script(_scripted)
    return _SCRIPTED


CALL_SITES = {
    "F.cross_entropy": lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
    "early-bound import": lambda x, t: early_bound_cross_entropy(x, t, label_smoothing=0.1),
    "nn.CrossEntropyLoss": lambda x, t: nn.CrossEntropyLoss(label_smoothing=0.1)(x, t),
    "torch._C._nn.cross_entropy_loss": lambda x, t: torch._C._nn.cross_entropy_loss(
        x, t, None, 1, -100, 0.1),
    "aten::cross_entropy_loss": lambda x, t: torch.ops.aten.cross_entropy_loss(
        x, t, None, 1, -100, 0.1),
    "TorchScript": lambda x, t: _script()(x, t),
}


@pytest.mark.parametrize("site", list(CALL_SITES))
def test_each_call_site_runs_xent_and_matches_torch(site):
    fn = CALL_SITES[site]
    x, t = _data()
    ref_loss, ref_grad, ref_node = _grad_of(fn, x, t)
    assert OURS not in ref_node
    with xent_ext.patch():
        loss, grad, node = _grad_of(fn, x, t)
    assert node == OURS, f"{site} ran {node} while patched"
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    _, _, after = _grad_of(fn, x, t)
    assert after == ref_node, "torch's own kernel is back after the patch"


def test_reductions_and_weight_through_aten():
    x, t = _data(seed=3)
    w = torch.rand(11, dtype=torch.float64) + 0.5
    for red in (0, 1, 2):
        ref = torch.ops.aten.cross_entropy_loss(x, t, w, red, -100, 0.0)
        with xent_ext.patch():
            got = torch.ops.aten.cross_entropy_loss(x, t, w, red, -100, 0.0)
        torch.testing.assert_close(got, ref)


def test_inference_mode_call_runs_xent(monkeypatch):
    calls = []
    import xent_ext._aten_override as override

    real = override.cross_entropy
    monkeypatch.setattr(override, "cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t = _data()
    with torch.inference_mode():
        ref = early_bound_cross_entropy(x, t)
        with xent_ext.patch():
            got = early_bound_cross_entropy(x, t)
    assert calls == [1]
    torch.testing.assert_close(got, ref)


def test_patch_options_apply_to_every_call_site():
    x, t = _data(seed=5)
    opts = dict(z_loss=1e-3, softcap=3.0, logit_scale=0.7)
    want = xent_ext.cross_entropy(x, t, label_smoothing=0.1, **opts)
    with xent_ext.patch(**opts):
        for site, fn in CALL_SITES.items():
            torch.testing.assert_close(fn(x, t), want, msg=site)
    assert not torch.allclose(F.cross_entropy(x, t, label_smoothing=0.1), want)


def test_patch_inplace_backward_option():
    x, t = _data(seed=6)
    layer = nn.Linear(11, 11, dtype=torch.float64)
    ref_loss = F.cross_entropy(layer(x), t)
    ref_loss.backward()
    ref = layer.weight.grad.clone()
    layer.weight.grad = None
    with xent_ext.patch(inplace_backward=True):
        logits = layer(x)
        loss = early_bound_cross_entropy(logits, t)
        assert not torch.equal(logits.detach(), layer(x).detach())  # overwritten
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(layer.weight.grad, ref)


@pytest.mark.parametrize("name", ["zloss", "label_smoothing", "weight", "bogus"])
def test_unknown_option_raises_type_error(name):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
        xent_ext.patch(**{name: 0.1})
    assert not xent_ext.is_patched()


@pytest.mark.parametrize("name", ["return_lse", "return_z_loss"])
def test_options_that_change_the_return_are_refused(name):
    with pytest.raises(TypeError, match=name):
        xent_ext.patch(**{name: True})
    assert not xent_ext.is_patched()


@pytest.mark.parametrize("opts, error", [({"z_loss": -1.0}, "z_loss"),
                                         ({"softcap": 0.0}, "softcap"),
                                         ({"logit_scale": float("inf")}, "logit_scale")])
def test_bad_option_values_raise_at_patch_time(opts, error):
    with pytest.raises(ValueError, match=error):
        xent_ext.patch(**opts)
    assert not xent_ext.is_patched()


def test_nested_options_newest_applies_then_outer_comes_back():
    x, t = _data(seed=7)
    outer = xent_ext.cross_entropy(x, t, z_loss=0.1)
    inner = xent_ext.cross_entropy(x, t, softcap=2.0)
    with xent_ext.patch(z_loss=0.1):
        torch.testing.assert_close(early_bound_cross_entropy(x, t), outer)
        with xent_ext.patch(softcap=2.0):
            torch.testing.assert_close(early_bound_cross_entropy(x, t), inner)
            torch.testing.assert_close(F.cross_entropy(x, t), inner)
        torch.testing.assert_close(early_bound_cross_entropy(x, t), outer)
    torch.testing.assert_close(early_bound_cross_entropy(x, t), F.cross_entropy(x, t))
    assert not xent_ext.is_patched()


def test_re_entrant_patch_inside_a_patched_call():
    """A cross entropy whose caller patches again (a loss function that calls patch itself)."""
    x, t = _data(seed=8)

    def loss_fn(a, b):
        with xent_ext.patch():
            return early_bound_cross_entropy(a, b)

    with xent_ext.patch():
        got = loss_fn(x, t)
        assert xent_ext.is_patched()
    torch.testing.assert_close(got, F.cross_entropy(x, t))
    assert not xent_ext.is_patched()


def test_patches_from_threads():
    x, t = _data(seed=9)
    ref = F.cross_entropy(x, t)
    errors, barrier = [], threading.Barrier(4)

    def worker():
        try:
            for _ in range(20):
                barrier.wait(timeout=10)
                with xent_ext.patch():
                    loss = early_bound_cross_entropy(x.clone().requires_grad_(), t)
                    assert type(loss.grad_fn).__name__ == OURS
                    torch.testing.assert_close(loss.detach(), ref)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert not xent_ext.is_patched()
    assert type(early_bound_cross_entropy(x.requires_grad_(), t).grad_fn).__name__ != OURS


def test_what_xent_cannot_run_goes_to_torch_unless_options_are_set():
    x = torch.empty(4, 5, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    for fn in (early_bound_cross_entropy, F.cross_entropy, nn.CrossEntropyLoss()):
        with xent_ext.patch():
            assert fn(x, t).device.type == "meta"
        with xent_ext.patch(z_loss=1e-4), pytest.raises(RuntimeError, match="z_loss"):
            fn(x, t)
    assert not xent_ext.is_patched()


def test_compiled_call_while_patched():
    x, t = _data(seed=10)
    fn = torch.compile(lambda a, b: early_bound_cross_entropy(a, b), fullgraph=True)
    with xent_ext.patch():
        got = fn(x, t)
    torch.testing.assert_close(got, F.cross_entropy(x, t))


@pytest.mark.parametrize("site", ["F.cross_entropy", "early-bound import",
                                  "aten::cross_entropy_loss"])
def test_autocast_runs_in_float32_as_torch(site):
    fn = CALL_SITES[site]
    x, t = _data(seed=11)
    x = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fn(x, t)
        with xent_ext.patch():
            got = fn(x.clone().requires_grad_(), t)
    assert got.dtype == want.dtype == torch.float32
    assert type(got.grad_fn).__name__ == OURS
    torch.testing.assert_close(got.detach(), want)


# torch.func scripts a helper of its own on first use, with torch's deprecation warning.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_func_transforms_while_patched():
    x, t = _data(seed=12)
    t = t.clamp(min=0)

    def loss(a, b):
        return early_bound_cross_entropy(a, b, label_smoothing=0.1)

    small, t_small = x[:2, :4], t[:2].clamp(max=3)
    want_grad = torch.func.grad(loss)(x, t)
    want_hessian = torch.func.hessian(loss)(small, t_small)
    with xent_ext.patch():
        got_grad = torch.func.grad(loss)(x, t)
        got_hessian = torch.func.hessian(loss)(small, t_small)
        rows = torch.vmap(lambda a, b: early_bound_cross_entropy(a, b))(x, t)
    torch.testing.assert_close(got_grad, want_grad)
    torch.testing.assert_close(got_hessian, want_hessian)
    torch.testing.assert_close(rows, F.cross_entropy(x, t, reduction="none"))
