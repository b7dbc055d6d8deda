"""Full parity with F.cross_entropy: class weights, label smoothing, probability targets, K-dim
and no-batch inputs, the legacy size_average / reduce, empty tensors, and the same errors for
bad input (type and message), with nothing modified by a rejected call."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .conftest import DEVICES, DTYPES, assert_close_to_reference, random_logits, random_targets

REDUCTIONS = ["none", "mean", "sum"]


def _weight(c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype).to(device)


def _probs(shape, dtype, device, seed=0, class_dim=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2,
                         class_dim).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("c", [1, 7, 2050])
def test_index_targets_weights_smoothing(device, dtype, reduction, eps, weighted, c):
    x = random_logits((33, c), dtype, device)
    t = random_targets((33,), c, device, ignore_frac=0.25)
    kw = dict(reduction=reduction, label_smoothing=eps)
    if weighted:
        kw["weight"] = _weight(c, dtype, device)
    assert_close_to_reference(x, t, upstream="random", **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(device, dtype, reduction, eps, weighted):
    c = 37
    x = random_logits((21, c), dtype, device)
    q = _probs((21, c), dtype, device)
    kw = dict(reduction=reduction, label_smoothing=eps)
    if weighted:
        kw["weight"] = _weight(c, dtype, device)
    assert_close_to_reference(x, q, upstream="random", **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probability_targets_large_vocabulary(device, dtype):
    """Long sums over 40000 classes must keep their digits (the gradient depends on them)."""
    c = 40000
    x = random_logits((3, c), dtype, device)
    q = _probs((3, c), dtype, device)
    assert_close_to_reference(x, q, upstream="random", reduction="sum", label_smoothing=0.1,
                              weight=_weight(c, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 5, 3), (2, 7, 3, 4), (3, 1, 5), (2, 300, 2, 2, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kdim_inputs(device, dtype, shape, reduction):
    c = shape[1]
    x = random_logits(shape, dtype, device)
    t = random_targets((shape[0],) + shape[2:], c, device, ignore_frac=0.2)
    w = _weight(c, dtype, device)
    assert_close_to_reference(x, t, upstream="random", reduction=reduction)
    assert_close_to_reference(x, t, upstream="random", reduction=reduction, weight=w,
                              label_smoothing=0.2)
    q = _probs(shape, dtype, device)
    assert_close_to_reference(x, q, upstream="random", reduction=reduction, weight=w,
                              label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_batch_input(device, dtype):
    x = random_logits((11,), dtype, device)
    for reduction in REDUCTIONS:
        assert_close_to_reference(x, torch.tensor(4, device=device), reduction=reduction)
        assert_close_to_reference(x, torch.tensor(-100, device=device), reduction=reduction)
        assert_close_to_reference(x, _probs((11,), dtype, device, class_dim=0),
                                  reduction=reduction, label_smoothing=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_probability_targets_promote_like_torch(device):
    x = random_logits((5, 6), torch.float32, device)
    for tdtype in (torch.float64, torch.float16):
        q = _probs((5, 6), tdtype, device)
        ours, ref = xent_ext.cross_entropy(x, q), F.cross_entropy(x, q)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("size_average,reduce", [(None, False), (True, None), (False, None),
                                                  (True, True), (False, True), (None, True)])
def test_legacy_reduction_arguments(size_average, reduce):
    x = random_logits((6, 5), torch.float32, "cpu")
    t = random_targets((6,), 5, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = xent_ext.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        ref = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,tshape,prob", [((0, 5), (0,), False), ((0, 5), (0, 5), True),
                                               ((2, 3, 0), (2, 0), False), ((0, 0), (0,), False)])
def test_empty_tensors_match_torch(device, reduction, shape, tshape, prob):
    x = torch.randn(shape, device=device, requires_grad=True)
    t = torch.rand(tshape, device=device) if prob else torch.zeros(tshape, dtype=torch.long,
                                                                    device=device)
    ours = xent_ext.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == x.shape


# ---- bad input: same exception type as torch, a message naming the problem ----------------
def _bad_cases():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    return {
        "target too large": ((x, torch.tensor([0, 1, 2, 5])), {}, IndexError,
                             "Target 5 is out of bounds"),
        "negative target": ((x, torch.tensor([0, -3, 2, 1])), {}, IndexError,
                            "Target -3 is out of bounds"),
        "target out of range, weighted": ((x, torch.tensor([9, 1, 2, 1])),
                                          {"weight": torch.ones(5)}, IndexError,
                                          "Target 9 is out of bounds"),
        "target out of range, no classes": ((torch.randn(3, 0), torch.zeros(3, dtype=torch.long)),
                                            {}, IndexError, "out of bounds"),
        "int32 target": ((x, t.int()), {}, RuntimeError, "target dtype"),
        "bool target": ((x, t.bool()), {}, RuntimeError, "target dtype"),
        "float target, wrong shape": ((x, t.float()), {}, RuntimeError, "target dtype"),
        "integer probabilities": ((x, torch.ones(4, 5, dtype=torch.long)), {}, RuntimeError,
                                  "floating point type for target"),
        "ignore_index with probabilities": ((x, torch.rand(4, 5)), {"ignore_index": 1},
                                            RuntimeError, "ignore_index"),
        "batch mismatch": ((x, torch.tensor([0, 1, 2])), {}, ValueError, "batch_size"),
        "kdim mismatch": ((torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)), {},
                          RuntimeError, "target size"),
        "2-d target for 2-d input": ((x, torch.zeros(4, 1, dtype=torch.long)), {}, RuntimeError,
                                     "1D target"),
        "weight size": ((x, t), {"weight": torch.ones(4)}, RuntimeError, "weight"),
        "weight 2-d": ((x, t), {"weight": torch.ones(5, 1)}, RuntimeError, "weight"),
        "weight dtype": ((x, t), {"weight": torch.ones(5, dtype=torch.float64)}, RuntimeError,
                         "Double"),
        "weight integer": ((x, t), {"weight": torch.ones(5, dtype=torch.long)}, RuntimeError,
                           "Long"),
        "label_smoothing > 1": ((x, t), {"label_smoothing": 1.5}, RuntimeError,
                                "label_smoothing"),
        "unknown reduction": ((x, t), {"reduction": "avg"}, ValueError, "reduction"),
        "integer input": ((x.long(), t), {}, NotImplementedError, None),
        "0-dim input": ((torch.tensor(1.0), torch.tensor(0)), {}, RuntimeError, None),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_like_torch(case):
    args, kwargs, exc, text = _bad_cases()[case]
    with pytest.raises(exc) as torch_err:
        F.cross_entropy(*args, **kwargs)
    with pytest.raises(exc) as ours_err:
        xent_ext.cross_entropy(*args, **kwargs)
    assert type(ours_err.value) is type(torch_err.value) or isinstance(ours_err.value, exc)
    if text is not None:
        assert text in str(ours_err.value), str(ours_err.value)


def test_negative_label_smoothing_is_rejected():
    """torch silently treats a negative label_smoothing as 0 for class-index targets; a value
    outside [0, 1] is a caller's mistake, so xent_ext names it instead."""
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
        xent_ext.cross_entropy(x, t, label_smoothing=-0.1)


def test_weight_requiring_grad_is_rejected():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="weight"):
        xent_ext.cross_entropy(x, t, weight=torch.ones(4, requires_grad=True))


def test_devices_must_match():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2], device="meta")
    with pytest.raises(RuntimeError, match="device"):
        xent_ext.cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="device"):
        xent_ext.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.ones(4, device="meta"))


def test_rejected_call_modifies_nothing():
    x = torch.randn(6, 9, requires_grad=True)
    t_bad = torch.tensor([0, 1, 2, 3, 4, 99])
    w = torch.rand(9) + 0.5
    xent_ext.cross_entropy(x, torch.zeros(6, dtype=torch.long)).backward()
    x_before, grad_before = x.detach().clone(), x.grad.clone()
    t_before, w_before = t_bad.clone(), w.clone()
    for kwargs in ({}, {"weight": w}, {"label_smoothing": 0.2}, {"reduction": "none"}):
        with pytest.raises(IndexError):
            xent_ext.cross_entropy(x, t_bad, **kwargs)
    assert torch.equal(x.detach(), x_before) and torch.equal(x.grad, grad_before)
    assert torch.equal(t_bad, t_before) and torch.equal(w, w_before)
    t_ok = t_bad.clamp(max=8)
    loss = xent_ext.cross_entropy(x, t_ok, weight=w)
    torch.testing.assert_close(loss, F.cross_entropy(x, t_ok, weight=w))
