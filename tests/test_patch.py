"""xent_ext.patch(): swaps F.cross_entropy (and what nn.CrossEntropyLoss calls) and restores it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xent_ext


def test_patch_swaps_and_restores():
    original = F.cross_entropy
    with xent_ext.patch():
        assert F.cross_entropy is not original
        assert xent_ext.is_patched()
    assert F.cross_entropy is original
    assert not xent_ext.is_patched()


def test_patch_restores_on_exception():
    original = F.cross_entropy
    with pytest.raises(ZeroDivisionError), xent_ext.patch():
        raise ZeroDivisionError
    assert F.cross_entropy is original


def test_plain_call_and_unpatch():
    original = F.cross_entropy
    xent_ext.patch()
    try:
        assert xent_ext.is_patched()
    finally:
        xent_ext.unpatch()
    assert F.cross_entropy is original


def test_module_and_functional_route_to_xent(monkeypatch):
    calls = []
    real = xent_ext.patching.cross_entropy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(xent_ext.patching, "cross_entropy", spy)
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with xent_ext.patch():
        a = F.cross_entropy(x, t, label_smoothing=0.1)
        b = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5)(x, t)
    assert len(calls) == 2
    assert a.shape == b.shape == ()


def _train(patched: bool, steps: int = 5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    model_copy = copy.deepcopy(model)
    opt = torch.optim.SGD(model_copy.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(steps)]
    losses = []
    ctx = xent_ext.patch() if patched else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with ctx:
        for x, y in data:
            opt.zero_grad()
            loss = criterion(model_copy(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_tiny_model_trains_the_same():
    plain = _train(False)
    patched = _train(True)
    assert plain[-1] < plain[0]  # it does learn
    for a, b in zip(plain, patched, strict=False):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
