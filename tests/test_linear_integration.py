"""linear_cross_entropy with torch's machinery: torch.compile(fullgraph=True), opcheck,
gradcheck, and its peak memory on the CPU (independent of the number of rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from bench.memory import peak_bytes
from xent_ext import _linear_ops

from .linear_support import make_case


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x, w, t, b, cw = make_case((2, 7), 10, 33, torch.float32, 21, class_weight=True)

    def step(x, w, b, t):
        loss, lse = xent_ext.linear_cross_entropy(x, w, t, b, class_weight=cw,
                                                  reduction=reduction, label_smoothing=0.1,
                                                  z_loss=1e-3, softcap=8.0, return_lse=True,
                                                  chunk_size=4)
        return loss.sum() * 2.0, lse

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xs, ws, bs = (a.detach().requires_grad_() for a in (x, w, b))
        loss, lse = fn(xs, ws, bs, t)
        loss.backward()
        results.append((loss.detach(), lse, xs.grad, ws.grad, bs.grad))
    for a, r in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, r)


# (rows per chunk or piece, classes per slab): the rows strategy, and class slabs of 3 of the
# 7 classes in pieces of 4 of the 9 rows.
TILES = {"rows": (4, 0), "slabs": (4, 3)}


def _fwd_args(reduction, need, tiles):
    x, w, t, b, cw = make_case(9, 5, 7, torch.float64, 3, class_weight=True)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    return (x, w, t.reshape(-1), b, cw, reduction, -100, 0.1, 1.2, 6.0, 1e-3, *TILES[tiles],
            False, *need)


@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_fwd(reduction, tiles):
    torch.library.opcheck(_linear_ops.fwd, _fwd_args(reduction, (True, True, True), tiles))
    torch.library.opcheck(_linear_ops.fwd, _fwd_args(reduction, (True, False, False), tiles))


@pytest.mark.parametrize("tiles", list(TILES))
def test_opcheck_bwd(tiles):
    x, w, t, b, cw = make_case(9, 5, 7, torch.float64, 4, class_weight=True)
    g = torch.rand(9, dtype=torch.float64)
    options = (-100, 0.1, 1.0, 0.0, 0.0)
    lse = _linear_ops.fwd(x, w, t, b, cw, 0, *options, *TILES[tiles], True, False, False,
                          False)[1]
    torch.library.opcheck(_linear_ops.bwd, (g, x, w, t, b, cw, *options, *TILES[tiles], lse,
                                            True, True, True))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.15, "z_loss": 1e-2,
                                          "softcap": 4.0, "logit_scale": 0.8}], ids=["plain",
                                                                                   "options"])
def test_gradcheck(reduction, options):
    x, w, t, b, cw = make_case(7, 4, 6, torch.float64, 5, class_weight=True)
    x, w, b = (a.requires_grad_() for a in (x, w, b))

    def fn(x, w, b):
        return xent_ext.linear_cross_entropy(x, w, t, b, class_weight=cw, reduction=reduction,
                                             chunk_size=3, **options)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def _extra_bytes(fn, n, h, v, dtype=torch.float32):
    """Peak bytes allocated during forward + backward beyond the gradients it must produce
    (d input, d weight), counted from torch's allocator (bench/memory.py)."""
    x, w, t, _, _ = make_case(n, h, v, dtype, 6, bias=False, ignore_frac=0.0)
    x.requires_grad_()
    w.requires_grad_()

    def step():
        fn(x, w, t).backward()

    peak = peak_bytes(step, "cpu")
    assert peak is not None, "torch.profiler gave no memory events"
    return peak - (x.numel() + w.numel()) * dtype.itemsize


def test_peak_memory_independent_of_rows():
    h, v, chunk = 32, 2000, 128

    def ours(x, w, t):
        return xent_ext.linear_cross_entropy(x, w, t, chunk_size=chunk)

    def naive(x, w, t):
        return F.cross_entropy(x @ w.t(), t)

    small, large = (_extra_bytes(ours, n, h, v) for n in (512, 4096))
    naive_large = _extra_bytes(naive, 4096, h, v)
    buffer = chunk * v * 4
    # One chunk x V buffer plus a few O(N) vectors (loss and lse rows), whatever N.
    assert large - small <= 16 * (4096 - 512) + (64 << 10), (small, large)
    assert large <= buffer + 4 * v * 4 + 16 * 4096 + (256 << 10), (large, buffer)
    assert large * 4 <= naive_large, (large, naive_large)


def test_peak_memory_half_weight_accumulator():
    # bfloat16 weights: the float32 weight-gradient accumulator (V x H x 4) is the extra.
    h, v, chunk = 32, 2000, 128

    def ours(x, w, t):
        return xent_ext.linear_cross_entropy(x, w, t, chunk_size=chunk)

    small, large = (_extra_bytes(ours, n, h, v, torch.bfloat16) for n in (512, 4096))
    assert large - small <= 16 * (4096 - 512) + (64 << 10), (small, large)
    assert large <= chunk * v * 2 + v * h * 4 + v * h * 2 + 16 * 4096 + (256 << 10)


# ---- torch.func transforms and forward-mode AD: the logits path, torch's derivatives --------
def _func_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    w = torch.randn(11, 7, generator=g, dtype=torch.float64)
    b = torch.randn(11, generator=g, dtype=torch.float64)
    t = torch.randint(0, 11, (2, 3), generator=g)
    t[0, 1] = -100
    return x, w, b, t


_FUNC_OPTIONS = [dict(), dict(reduction="none", label_smoothing=0.2, softcap=3.0),
                 dict(reduction="sum", z_loss=1e-2, logit_scale=0.7)]


def _torch_loss(x, w, b, t, options):
    o = dict(options)
    scale, cap, z = o.pop("logit_scale", 1.0), o.pop("softcap", None), o.pop("z_loss", 0.0)
    red = o.pop("reduction", "mean")
    y = F.linear(x, w, b) * scale
    if cap is not None:
        y = cap * torch.tanh(y / cap)
    rows = F.cross_entropy(y.flatten(0, -2), t.reshape(-1), reduction="none", **o)
    lse = torch.logsumexp(y.flatten(0, -2), -1)
    valid = t.reshape(-1) != -100
    rows = rows + torch.where(valid, z * lse * lse, torch.zeros_like(lse))
    if red == "none":
        return rows.reshape(t.shape)
    return rows.sum() if red == "sum" else rows.sum() / valid.sum()


@pytest.mark.parametrize("options", _FUNC_OPTIONS, ids=str)
def test_forward_mode_ad_matches_torch(options):
    import torch.autograd.forward_ad as fwAD
    x, w, b, t = _func_case()
    tangents = [torch.randn_like(v) for v in (x, w, b)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(v, dv) for v, dv in zip((x, w, b), tangents, strict=True)]
        ours = fwAD.unpack_dual(xent_ext.linear_cross_entropy(*duals[:2], t, duals[2],
                                                              **options))
        ref = fwAD.unpack_dual(_torch_loss(*duals[:2], duals[2], t, options))
    assert ours.tangent is not None
    torch.testing.assert_close(ours.primal, ref.primal)
    torch.testing.assert_close(ours.tangent, ref.tangent)


@pytest.mark.parametrize("options", _FUNC_OPTIONS, ids=str)
def test_torch_func_grad_hessian_vmap(options):
    x, w, b, t = _func_case()

    def ours(x, w):
        return xent_ext.linear_cross_entropy(x, w, t, b, **options).sum()

    def ref(x, w):
        return _torch_loss(x, w, b, t, options).sum()

    for a, e in zip(torch.func.grad(ours, argnums=(0, 1))(x, w),
                    torch.func.grad(ref, argnums=(0, 1))(x, w), strict=True):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(torch.func.hessian(ours, argnums=1)(x, w),
                               torch.func.hessian(ref, argnums=1)(x, w))
    batched = torch.func.vmap(
        lambda xx, tt: xent_ext.linear_cross_entropy(xx, w, tt, b, **options).sum())(x, t)
    torch.testing.assert_close(batched, torch.stack(
        [_torch_loss(xx, w, b, tt, options).sum() for xx, tt in zip(x, t, strict=True)]))
