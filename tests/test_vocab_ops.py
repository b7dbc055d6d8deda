"""The vocab-parallel operators in one process (tests/vocab_split.py): the vocabulary cut into
pieces, stats + combine + grad equal F.cross_entropy (float64 judge), over many shapes, cuts,
options and extremes; NaN patterns as torch; opcheck and torch.compile of the ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xent_ext import _composite
from xent_ext import _vocab_ops as vo

from .vocab_split import split_cross_entropy

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _ref(x, t, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
         logit_scale=1.0, softcap=0.0):
    xr = x.detach().double().requires_grad_()
    w = weight.double() if weight is not None else None
    if z_loss == 0 and logit_scale == 1.0 and softcap == 0:
        loss = F.cross_entropy(xr, t, weight=w, reduction=reduction,
                               label_smoothing=label_smoothing)
    else:
        red = {"none": 0, "mean": 1, "sum": 2}[reduction]
        loss, _ = _composite.cross_entropy(xr.unsqueeze(2), t.unsqueeze(1), w, red, -100,
                                           label_smoothing, logit_scale, softcap, z_loss)
        loss = loss.reshape(-1) if red == 0 else loss
    loss.sum().backward()
    return loss.detach(), xr.grad


def _close(got, want, tol):
    got = got.double()
    scale = 1 + want.abs().nan_to_num(0, 0, 0).max()
    same_nan = got.isnan() == want.isnan()
    assert same_nan.all(), (got, want)
    ok = ((got - want).abs() <= tol * scale) | (got == want) | got.isnan()
    assert ok.all(), ((got - want).abs().nan_to_num(0).max(), got, want)


CUTS = [(1, [1]), (3, [1, 2]), (11, [5, 6]), (11, [0, 11]), (13, [4, 1, 8]), (1000, [1, 999]),
        (1000, [333, 333, 334]), (4099, [2048, 2051])]
OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
           {"z_loss": 1e-3}, {"softcap": 5.0}, {"logit_scale": 0.5},
           {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "logit_scale": 1.5}]


@pytest.mark.parametrize("c, sizes", CUTS, ids=[f"{c}-{s}" for c, s in CUTS])
@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
def test_split_equals_cross_entropy(c, sizes, opts, weighted):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(5, c, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, c, (5,), generator=g)
    t[0] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    loss, grad, _ = split_cross_entropy(x, t, sizes, weight=w, **opts)
    want_loss, want_grad = _ref(x, t, w, **opts)
    _close(loss, want_loss, 1e-10)
    _close(grad, want_grad, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shift", [0.0, 1e4], ids=["near0", "plus1e4"])
def test_dtypes_and_shift(dtype, shift):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 300, generator=g, dtype=torch.float64) * 2 + shift).to(dtype)
    t = torch.randint(0, 300, (6,), generator=g)
    for opts in ({}, {"label_smoothing": 0.1}, {"softcap": 8.0, "reduction": "sum"}):
        loss, grad, _ = split_cross_entropy(x, t, [100, 7, 193], **opts)
        want_loss, want_grad = _ref(x, t, **opts)
        # shift invariance: the error is that of a row near 0 (float32 logits at 1e4 are
        # exact values; the judge takes them as they are).
        _close(loss, want_loss, TOL[dtype])
        _close(grad, want_grad, TOL[dtype])
        assert grad.dtype == dtype


def test_rows_at_1e30():
    x = torch.randn(4, 50, dtype=torch.float64) + 1e30
    x32 = torch.randn(4, 50) * 3 + 1e30
    t = torch.tensor([0, 49, 7, 20])
    for xx, tol in ((x, 1e-10), (x32, 2e-5)):
        loss, grad, lse = split_cross_entropy(xx, t, [10, 40], label_smoothing=0.1)
        # shifting a row changes nothing: compare with the same logits minus their max
        want_loss, want_grad = _ref(xx.double() - xx.double().amax(1, keepdim=True), t,
                                    label_smoothing=0.1)
        _close(loss, want_loss, tol)
        _close(grad, want_grad, tol)


def test_nan_patterns_as_torch():
    x = torch.randn(6, 9, dtype=torch.float64)
    x[0, 2] = torch.nan      # in the first piece
    x[1, 7] = torch.inf      # in the second
    x[2, :] = -torch.inf     # every entry masked
    x[3, :4] = -torch.inf    # the whole first piece masked
    x[4, 5] = torch.nan      # a NaN in an ignored row
    t = torch.tensor([1, 1, 1, 5, -100, 3])
    for opts in ({}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"z_loss": 1e-3},
                 {"reduction": "none", "softcap": 2.0}):
        loss, grad, _ = split_cross_entropy(x, t, [4, 5], **opts)
        want_loss, want_grad = _ref(x, t, **opts)
        _close(loss, want_loss, 1e-10)
        _close(grad, want_grad, 1e-10)


def test_all_ignored_mean_is_nan_with_zero_gradient():
    x = torch.randn(3, 8, dtype=torch.float64)
    t = torch.full((3,), -100)
    loss, grad, _ = split_cross_entropy(x, t, [3, 5])
    want_loss, want_grad = _ref(x, t)
    assert loss.isnan() and want_loss.isnan()
    _close(grad, want_grad, 0)


def test_opcheck():
    x = torch.randn(4, 6)
    t = torch.tensor([0, 7, 3, -100])
    w = torch.rand(6)
    torch.library.opcheck(vo.stats, (x, t, w, 2, -100, 0.1, 1.0, 0.0))
    torch.library.opcheck(vo.stats, (x, t, None, 2, -100, 0.0, 0.5, 3.0))
    coef = torch.randn(4, 4)
    torch.library.opcheck(vo.grad, (x, t, w, 2, coef, 1.0, 0.0))
    torch.library.opcheck(vo.grad_, (x.clone(), t, None, 2, coef, 1.0, 2.0))


def test_ops_trace_under_compile():
    x = torch.randn(4, 6)
    t = torch.tensor([0, 7, 3, -100])

    def f(x, t):
        s = vo.stats(x, t, None, 2, -100, 0.1, 1.0, 0.0)
        return vo.grad(x, t, None, 2, s[:, :4].contiguous(), 1.0, 0.0)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), f(x, t))


def _absolute(st):
    """The stats with their reference taken out (the kernels' reference may lag the max by up
    to 64): the slice's lse, the smoothing dot against 0, and the rest as they are."""
    m = st[:, 0]
    ref = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    out = st.clone()
    out[:, 0] = m + st[:, 1].log()
    out[:, 1] = 0
    out[:, 5] = st[:, 5] + st[:, 6] * ref
    return out


def test_cpu_kernels_match_the_aten_implementation():
    """The fused CPU kernels and the ATen implementation (what CUDA runs) agree: the stats up
    to rounding (a NaN logit may leave the kernels' max finite: the NaN is in the sum; a +inf
    logit gives a +inf max), the gradient likewise, in every dtype."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("xent_ext::vocab_stats", "CPU")
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(9, 2100, generator=g) * 3).to(dtype)  # more than one chunk
        x[6, 2000] = 200.0  # the reference rises late in the row
        x[0, 3] = torch.nan
        x[1, :] = -torch.inf
        x[2, 5] = torch.inf
        t = torch.randint(0, 2150, (9,), generator=g)
        t[3] = -100
        w = (torch.rand(2100, generator=g) + 0.5).to(dtype)
        for args in ((w, 10, -100, 0.1, 1.0, 0.0), (None, 0, -100, 0.0, 0.7, 4.0),
                     (None, 20, 5, 0.3, -1.0, 0.0)):
            got = vo.stats(x, t, *args)
            want = vo.stats_aten(x, t, *args)
            rows = ~(want[:, 0].isnan() | (want[:, 0] == torch.inf))
            ga, wa = _absolute(got[rows]), _absolute(want[rows])
            keep = [0, 2, 3, 4, 6]
            torch.testing.assert_close(ga[:, keep], wa[:, keep], rtol=1e-5, atol=1e-5,
                                       equal_nan=True)
            # The smoothing dot sums V terms of either sign: its rounding scales with their
            # size (the dot relative to the max), not with the result.
            size = want[rows, 5].abs() + 1
            assert (((ga[:, 5] - wa[:, 5]).abs() <= 2e-5 * size) | (ga[:, 5] == wa[:, 5])).all()
            # NaN rows: a NaN sum; +inf rows: a +inf max (the combine makes both NaN).
            assert (got[~rows, 1].isnan() | (got[~rows, 0] == torch.inf)).all()
            coef = torch.randn(9, 4, generator=g, dtype=got.dtype)
            # a reference as the forward gives it: the row's max (exp(y - ref) <= 1)
            coef[:, 0] = torch.where(want[:, 0].isfinite(), want[:, 0], coef[:, 0])
            gw, start, scale, cap = args[0], args[1], args[4], args[5]
            gg = vo.grad(x, t, gw, start, coef, scale, cap)
            ga = vo.grad_aten(x, t, gw, start, coef, scale, cap)
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
            # Row 2 (+inf) left out: its true coefficients are NaN (the NaN patterns are tested
            # through the real ones above); random ones would only test exp(+inf).
            fin = torch.arange(9) != 2
            torch.testing.assert_close(gg[fin], ga[fin], rtol=tol, atol=tol, equal_nan=True)
            inplace = x.clone()
            vo.grad_(inplace, t, gw, start, coef, scale, cap)
            torch.testing.assert_close(inplace, gg, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("c, sizes", CUTS[::2], ids=[f"{c}-{s}" for c, s in CUTS[::2]])
def test_aten_implementation_equals_cross_entropy(monkeypatch, c, sizes):
    """The ATen implementation alone (what CUDA runs) through the same combine: the CPU
    kernels swapped out."""
    monkeypatch.setattr(vo, "stats", vo.stats_aten)
    monkeypatch.setattr(vo, "grad", vo.grad_aten)
    g = torch.Generator().manual_seed(c + 1)
    x = torch.randn(5, c, generator=g, dtype=torch.float64) * 4
    x[2, 0] = torch.nan
    t = torch.randint(0, c, (5,), generator=g)
    t[0] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    for opts in OPTIONS:
        for weight in (None, w):
            loss, grad, _ = split_cross_entropy(x, t, sizes, weight=weight, **opts)
            want_loss, want_grad = _ref(x, t, weight, **opts)
            _close(loss, want_loss, 1e-10)
            _close(grad, want_grad, 1e-10)
