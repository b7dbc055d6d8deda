"""linear_cross_entropy's class-slab strategy (xent_ext/_class_slabs.py) against the float64
logits path: every option and reduction in every dtype with slabs and row pieces that do not
divide V and N, ignored rows, edge cases, the plan's choice, and its peak memory."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from xent_ext import _linear_plan

from .linear_support import assert_close, assert_grads_close, make_case, reference
from .test_linear import DTYPES, OPTIONS, _run
from .test_linear_integration import _extra_bytes

N, H, V = 37, 13, 29


@pytest.fixture
def small_tiles(monkeypatch):
    """Slabs of 8 classes and pieces of 16 rows at tiny budgets (the real floors are 256), so
    that N = 37 and V = 29 make 3 x 4 tiles, the last of each partial.  Returns the budget in
    bytes for `pieces` (16-row pieces) or whole rows (`pieces=False`) of dtype."""
    monkeypatch.setattr(_linear_plan, "MIN_SLAB_CLASSES", 8)
    monkeypatch.setattr(_linear_plan, "MIN_SLAB_ROWS", 16)

    def budget(dtype, pieces=True, n=N):
        return (16 if pieces else n) * 8 * dtype.itemsize

    return budget


def _plan(n, v, h, dtype, chunk_bytes, need_w=True):
    return _linear_plan.plan(n, v, h, dtype, torch.device("cpu"), None, chunk_bytes, need_w)


def test_small_tiles_give_slabs(small_tiles):
    for dtype in DTYPES:
        assert _plan(N, V, H, dtype, small_tiles(dtype)) == _linear_plan.Plan(16, 8)
        assert _plan(N, V, H, dtype, small_tiles(dtype, False)) == _linear_plan.Plan(N, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_slabs_match_reference(small_tiles, dtype, reduction, option):
    opts = dict(OPTIONS[option])
    use_cw = opts.pop("class_weight", False)
    seed = zlib.crc32(f"slabs{dtype}{reduction}{option}".encode()) % 10_000
    x, w, t, b, cw = make_case(N, H, V, dtype, seed, class_weight=use_cw)
    upstream = None
    if reduction == "none":
        upstream = (torch.rand(N, generator=torch.Generator().manual_seed(seed)) + 0.5
                    ).to(dtype)
    _, ref_loss, ref_grads = reference(x, w, t, b, class_weight=cw, reduction=reduction,
                                       upstream=upstream, **opts)
    for pieces in (True, False):
        _, loss, grads = _run(x, w, t, b, cw, upstream, reduction=reduction,
                              chunk_bytes=small_tiles(dtype, pieces), **opts)
        assert loss.dtype == dtype
        assert_close(loss, ref_loss, dtype, "loss")
        assert_grads_close(grads, ref_grads, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_slabs_all_rows_ignored_and_empty(small_tiles, reduction):
    x, w, t, b, _ = make_case(N, H, V, torch.float64, 2, ignore_frac=0.0)
    t[:] = -100
    _, loss, grads = _run(x, w, t, b, None, reduction=reduction,
                          chunk_bytes=small_tiles(torch.float64))
    _, ref_loss, ref_grads = reference(x, w, t, b, reduction=reduction)
    assert_close(loss, ref_loss, torch.float64, "loss")  # NaN for 'mean', as torch
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    x, w, t, b, _ = make_case(0, H, V, torch.float32, 2)
    _, loss, grads = _run(x, w, t, b, None, reduction=reduction,
                          chunk_bytes=small_tiles(torch.float32))
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w, b), t, reduction=reduction),
                               equal_nan=True)
    assert grads[0].shape == (0, H) and not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_slabs_return_lse_and_z_loss(small_tiles, dtype, reduction):
    # return_lse keeps the ignored rows in the GEMMs (their lse is asked for).
    x, w, t, b, cw = make_case((2, 19), H, V, dtype, 8, class_weight=True)
    opts = dict(class_weight=cw, reduction=reduction, z_loss=1e-2, softcap=4.0,
                label_smoothing=0.1, return_z_loss=True, return_lse=True,
                chunk_bytes=small_tiles(dtype, n=38))
    loss, z, lse = xent_ext.linear_cross_entropy(x, w, t, b, **opts)
    logits = F.linear(x.double(), w.double(), b.double()).reshape(-1, V)
    r_loss, r_z, r_lse = xent_ext.cross_entropy(
        logits, t.reshape(-1), weight=cw.double(), reduction=reduction, z_loss=1e-2,
        softcap=4.0, label_smoothing=0.1, return_z_loss=True, return_lse=True)
    assert_close(lse, r_lse.reshape(t.shape), dtype, "lse")
    assert_close(z, r_z.reshape(z.shape), dtype, "z term")
    assert_close(loss, r_loss.reshape(loss.shape), dtype, "loss")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_slabs_second_backward_and_partial_grads(small_tiles, reduction):
    x, w, t, b, _ = make_case(N, H, V, torch.float64, 12)
    budget = small_tiles(torch.float64)
    xs, ws, bs = (a.detach().requires_grad_() for a in (x, w, b))
    loss = xent_ext.linear_cross_entropy(xs, ws, t, bs, reduction=reduction,
                                         chunk_bytes=budget)
    g1, g2 = torch.full_like(loss, 2.0), torch.full_like(loss, -0.5)
    first = torch.autograd.grad(loss, (xs, ws, bs), g1, retain_graph=True)
    second = torch.autograd.grad(loss, (xs, ws, bs), g2)
    _, _, ref1 = reference(x, w, t, b, reduction=reduction, upstream=g1)
    _, _, ref2 = reference(x, w, t, b, reduction=reduction, upstream=g2)
    for a, r in zip(first + second, ref1 + ref2, strict=True):
        torch.testing.assert_close(a, r)
    ws = w.detach().requires_grad_()  # the weight alone
    loss = xent_ext.linear_cross_entropy(x, ws, t, b, reduction=reduction, chunk_bytes=budget)
    (gw,) = torch.autograd.grad(loss, ws, g1)
    torch.testing.assert_close(gw, ref1[1])


@pytest.mark.parametrize("bad", [V, -1, -100_000])
def test_slabs_out_of_bounds_target_raises(small_tiles, bad):
    x, w, t, b, _ = make_case(N, H, V, torch.float32, 4)
    t[5] = bad
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        xent_ext.linear_cross_entropy(x, w, t, b, chunk_bytes=small_tiles(torch.float32))


def test_slabs_extreme_logits(small_tiles):
    # Rows whose logits are ~1e4 apart across slabs: every sum is taken against the row's max,
    # merged over the slabs, so the loss is exact where exp would overflow.
    x, w, t, b, _ = make_case(N, H, V, torch.float32, 7)
    b = b.clone()
    b[3] = 1e4
    b[20] = -1e4
    _, loss, grads = _run(x, w, t, b, None, chunk_bytes=small_tiles(torch.float32))
    _, ref_loss, ref_grads = reference(x, w, t, b)
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_grads_close(grads, ref_grads, torch.float32)


def test_plan_defaults():
    plan = _linear_plan.plan
    cpu = torch.device("cpu")
    # The language-model shapes of the CPU bench: slabs within the default budgets.
    p = plan(4096, 32000, 2048, torch.bfloat16, cpu, None, None, True)
    assert p.slab == 4096 and p.rows == 4096
    p = plan(1024, 128256, 2048, torch.float32, cpu, None, None, True)
    assert p.slab == 3072 and p.rows == 1024
    # Very many rows: slabs of the fewest classes, rows in pieces.
    p = plan(1 << 20, 32000, 64, torch.bfloat16, cpu, None, None, True)
    assert p.slab == _linear_plan.MIN_SLAB_CLASSES and p.rows < 1 << 20
    # Small batches fit one chunk: rows (three GEMMs).
    assert plan(8, 32000, 2048, torch.bfloat16, cpu, None, None, True).slab == 0
    # chunk_size asks for rows; a large budget gives rows.
    assert plan(4096, 32000, 2048, torch.bfloat16, cpu, 512, None, True) == (
        _linear_plan.Plan(512, 0))
    assert plan(4096, 32000, 2048, torch.bfloat16, cpu, None, 1 << 30, True).slab == 0
    # float32 weights accumulate their gradient in place: rows chunks when they fit.
    assert plan(4096, 1000, 64, torch.float32, cpu, None, None, True) == (
        _linear_plan.Plan(3136, 0))


def test_slabs_peak_memory():
    # bfloat16, several tiles: the extra memory is the tile buffer plus d input's float32
    # accumulator and half temporary (6 bytes per input element), not the float32 weight
    # accumulator of the rows strategy (V x H x 4) nor anything of size N x V.
    h, v, budget = 32, 4000, 256 << 10

    def ours(x, w, t):
        return xent_ext.linear_cross_entropy(x, w, t, chunk_bytes=budget)

    def naive(x, w, t):
        return F.cross_entropy(x @ w.t(), t)

    assert _plan(4096, v, h, torch.bfloat16, budget).slab > 0
    small, large = (_extra_bytes(ours, n, h, v, torch.bfloat16) for n in (512, 4096))
    per_row = 6 * h + 64  # d input accumulator and temporary, loss/lse/statistics rows
    assert large - small <= per_row * (4096 - 512) + (64 << 10), (small, large)
    assert large <= budget + per_row * 4096 + (256 << 10), large
    assert large * 8 <= _extra_bytes(naive, 4096, h, v, torch.bfloat16)
