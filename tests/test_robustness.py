"""No silent wrong answers from the row math, on every path that computes a row: each CPU kernel
(one row per SIMD lane, K-dim lanes, one row at a time, rows of several chunks, a row split
across threads) on every instruction set of this machine, and every CUDA regime through the CPU
emulation of the kernels.  The judge is F.cross_entropy in float64 on the same (rounded) values,
NaN and infinity patterns included:

- shift invariance: rows offset by 1e4 .. 1e30 are as accurate as rows near 0 (the loss is formed
  as (ref - y_t) + log(sum), never as lse - y_t with lse holding the row's magnitude);
- the label-smoothing sum does not depend on an outlier first logit (-1e30, -inf);
- rows with NaN, +inf or only -inf logits, -inf targets, ignored rows with such logits, inf and
  NaN class weights on classes no target uses: torch's pattern exactly;
- a target of -2**63 is out of bounds, not "ignored".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .conftest import cpu_isas
from .emu_support import RED, SHAPES, TOL, assert_close_nan, emu_forward

INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Path:
    name: str
    n: int  # rows (n) per call
    c: int
    s: int
    isa: str | None = None  # CPU: the instruction set forced
    threads: int | None = None  # CPU: torch threads during the call
    regime: str | None = None  # emulated CUDA: the regime forced
    dev: dict | None = None

    @property
    def emulated(self) -> bool:
        return self.regime is not None


# CPU kernels, reached by the shape of the call.
_CPU_SHAPES = [("lanes", 6, 7, 1, None), ("kdim-lanes", 2, 5, 3, None), ("rows", 6, 300, 1, None),
               ("rows-chunks", 3, 4500, 1, None), ("split", 1, 9000, 1, 4)]
_EMU = ("group8", "group32", "group-short-rows", "group-tiny-rows", "group32x4h", "regs",
        "regs-cluster", "regs-a100", "block", "block-partial-cache", "split", "kdim-300",
        "kdim-tiles", "kdim-aligned", "kdim-transposed", "strided")
PATHS = [Path(f"cpu-{isa}-{name}", n, c, s, isa=isa, threads=th)
         for isa in cpu_isas() for name, n, c, s, th in _CPU_SHAPES]
PATHS += [Path(f"emu-{name}", n, c, s, regime=regime, dev=dev)
          for name, n, c, s, regime, dev, _ in SHAPES if name in _EMU]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _op(path: Path, request, x, t, weight, reduction, ls):
    """(loss, lse, grad) of the forward op on one path; x (N, C, S)."""
    if path.emulated:
        loss, lse, grad, _ = emu_forward(request.getfixturevalue("emu"), x, t, weight=weight,
                                         reduction=reduction, ls=ls, regime=path.regime,
                                         dev=path.dev)
        return loss, lse, grad
    threads = torch.get_num_threads()
    xent_ext.set_cpu_isa(path.isa)
    try:
        if path.threads:
            torch.set_num_threads(path.threads)
        return torch.ops.xent_ext.cross_entropy_fwd(x, t, weight, RED[reduction], -100, ls, 1.0,
                                                    0.0, 0.0, True)
    finally:
        torch.set_num_threads(threads)
        xent_ext.set_cpu_isa("auto")


def _reference(x, t, weight, reduction, ls):
    """F.cross_entropy in float64 on the same values, in the caller's layout: loss, grad."""
    x64 = x.double().requires_grad_()
    s = x.shape[2]
    xr = x64 if s > 1 else x64[:, :, 0]
    if t.is_floating_point():
        tr = t.double() if s > 1 else t.double()[:, :, 0]
    else:
        tr = t if s > 1 else t[:, 0]
    w = weight.double() if weight is not None else None
    loss = F.cross_entropy(xr, tr, weight=w, reduction=reduction, label_smoothing=ls)
    (grad,) = torch.autograd.grad(loss, x64, torch.ones_like(loss))
    return loss.detach().reshape(-1), grad


def _calls(path: Path, rows: torch.Tensor, targets: torch.Tensor, dtype, seed=0):
    """Rows (L, C) of float64 logits and their targets (L,) (class indices, or (L, C)
    probabilities), padded with random rows and cut into the path's calls: (x (N, C, S),
    t (N, S) or (N, C, S)) in `dtype`."""
    per = path.n * path.s
    g = torch.Generator().manual_seed(seed)
    pad = -rows.shape[0] % per
    rows = torch.cat([rows, torch.randn(pad, path.c, generator=g, dtype=torch.float64) * 3])
    if targets.dim() == 2:
        q = torch.softmax(torch.randn(pad, path.c, generator=g, dtype=torch.float64), 1)
        targets = torch.cat([targets, q])
    else:
        targets = torch.cat([targets, torch.randint(0, path.c, (pad,), generator=g)])
    for k in range(rows.shape[0] // per):
        x = rows[k * per:(k + 1) * per].view(path.n, path.s, path.c).permute(0, 2, 1)
        t = targets[k * per:(k + 1) * per]
        if t.dim() == 2:
            t = t.view(path.n, path.s, path.c).permute(0, 2, 1).contiguous().to(dtype)
        else:
            t = t.view(path.n, path.s)
        yield x.contiguous().to(dtype), t


def _check(path: Path, request, rows, targets, dtype, weight=None, reduction="none", ls=0.0,
           what=""):
    tol = TOL[dtype]
    if weight is not None and dtype != torch.float64:
        weight = weight.float()
    for x, t in _calls(path, rows, targets, dtype):
        loss, lse, grad = _op(path, request, x, t, weight, reduction, ls)
        ref_loss, ref_grad = _reference(x, t, weight, reduction, ls)
        ref_loss = ref_loss.to(dtype).double()  # the loss is returned in the input dtype
        label = f"{path.name} {dtype} {reduction} ls={ls} {what}"
        assert_close_nan(loss.reshape(-1), ref_loss, tol, "loss " + label)
        fin = torch.isfinite(ref_grad)
        gscale = max(ref_grad[fin].abs().max().item(), 1e-30) if fin.any() else 1.0
        assert_close_nan(grad / gscale, ref_grad / gscale, tol, "grad " + label)
        ref_lse = torch.logsumexp(x.double(), dim=1).reshape(-1)
        # torch's logsumexp of a row with +inf is +inf where log_softmax is NaN: compare the
        # finite ones (the NaN pattern of lse is ours: NaN whenever the row's log-probs are).
        ok = torch.isfinite(ref_lse)
        assert_close_nan(lse.reshape(-1)[ok], ref_lse[ok], tol, "lse " + label)


def _random_rows(n, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale,
            torch.randint(0, c, (n,), generator=g))


# ---- 1. shift invariance --------------------------------------------------------------------
SHIFTS = {torch.float64: (1e4, -1e6, 1e15, 1e30), torch.float32: (1e4, -3e4, 1e30),
          torch.bfloat16: (1e4, -1e30), torch.float16: (1e4, -3e4)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_shift_invariance(request, path, dtype):
    """Logits offset by a constant: loss, gradient and lse as accurate as near 0 (the reference
    is computed on the same rounded values, so only our error counts)."""
    for shift in SHIFTS[dtype]:
        x, t = _random_rows(2 * path.n * path.s, path.c, seed=path.c + int(math.log10(abs(shift))))
        x = x + shift
        _check(path, request, x, t, dtype, what=f"shift={shift}")
        w = torch.rand(path.c, dtype=torch.float64) + 0.5
        _check(path, request, x, t, dtype, weight=w, ls=0.2, what=f"shift={shift} weight")
        _check(path, request, x, t, dtype, reduction="mean", ls=0.1, what=f"shift={shift} mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_equal_huge_logits_give_log_c(request, path, dtype):
    """Rows of equal logits at 1e30 (6e4 in float16): the loss is log C, the gradient 1/C - 1 at
    the target and 1/C elsewhere, whatever the magnitude."""
    big = 6e4 if dtype == torch.float16 else 1e30
    rows = torch.full((path.n * path.s, path.c), big, dtype=torch.float64)
    t = torch.arange(rows.shape[0]) % path.c
    for ls in (0.0, 0.3):
        for x, tt in _calls(path, rows, t, dtype):
            loss, _, grad = _op(path, request, x, tt, None, "none", ls)
            torch.testing.assert_close(loss.double(), torch.full_like(loss.double(),
                                                                       math.log(path.c)),
                                       rtol=TOL[dtype], atol=0)
            _, ref_grad = _reference(x, tt, None, "none", ls)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", [p for p in PATHS if p.emulated or "avx" not in p.name],
                         ids=lambda p: p.name)
def test_shift_invariance_probability_targets(request, path, dtype):
    """Probability targets (the CPU's scalar path, every emulated regime), shifted rows."""
    for shift in SHIFTS[dtype][:2]:
        x, _ = _random_rows(path.n * path.s, path.c, seed=3)
        q = torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1)
        _check(path, request, x + shift, q, dtype, ls=0.1, what=f"prob shift={shift}")


# ---- 2. the label-smoothing reference -------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_smoothing_sum_ignores_an_outlier_first_logit(request, path, dtype):
    """A very negative or -inf first logit (or one far above the rest) with label smoothing:
    torch's finite value, or its inf, never NaN or a cancelled sum."""
    far = 6e4 if dtype == torch.float16 else 1e30
    x, t = _random_rows(5, path.c, seed=11)
    x[0, 0] = -far
    x[1, 0] = -INF
    x[2, 0] = far / 1e3 if dtype != torch.float16 else 6e4  # the first logit the max, far above
    x[3, :] += 1e4 if dtype != torch.float16 else 3e4
    x[3, 0] = -far
    x[4, 0] = -INF
    t[4] = 0  # the target on the -inf logit: loss inf
    t[:4] = torch.clamp(t[:4], min=1)
    w = torch.rand(path.c, dtype=torch.float64) + 0.5
    for ls in (0.1, 1.0):
        _check(path, request, x, t, dtype, ls=ls, what="outlier first logit")
        _check(path, request, x, t, dtype, weight=w, ls=ls, what="outlier first logit, weight")


# ---- 3. non-finite rows, targets and weights --------------------------------------------------
def _nonfinite_rows(c, seed):
    x, t = _random_rows(11, c, seed)
    t = torch.clamp(t, min=1)
    x[0, :] = -INF  # all -inf
    x[1, c // 2] = NAN
    x[2, c - 1] = INF
    x[3, 0] = NAN  # NaN first
    x[4, t[4]] = -INF  # the target's logit -inf: loss inf, gradient finite
    x[5, ::2] = -INF  # masked entries
    t[5] = 1
    x[6, :] = -INF  # ignored, all -inf
    x[7, 2] = NAN  # ignored, NaN
    x[8, 1] = INF  # ignored, +inf
    x[9, 0] = INF
    x[9, 1] = INF  # two +inf
    t[6:9] = -100
    # A NaN among -inf entries: the lane, slice or cluster block that holds it has max -inf
    # and a NaN sum, which the combine with the finite part must keep.
    x[10, :] = -INF
    x[10, 0] = 1.5
    x[10, c - 1] = NAN
    t[10] = 0
    return x, t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_nonfinite_rows_follow_torch(request, path, dtype):
    x, t = _nonfinite_rows(path.c, seed=5)
    for red in ("none", "sum", "mean"):
        for ls in (0.0, 0.2):
            _check(path, request, x, t, dtype, reduction=red, ls=ls, what="non-finite rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_nonfinite_weight_on_an_unused_class(request, path, dtype):
    """1 / count weights put inf on classes no target uses: without label smoothing torch's loss
    and gradients stay finite (only the targets' weights enter); with it they do not."""
    x, t = _random_rows(2 * path.n * path.s, path.c, seed=9)
    t = torch.clamp(t, min=2)
    for bad in (INF, NAN):
        w = torch.rand(path.c, dtype=torch.float64) + 0.5
        w[0], w[1] = bad, 0.0
        for red in ("none", "mean"):
            _check(path, request, x, t, dtype, weight=w, reduction=red, what=f"weight {bad}")
        if bad != bad:
            _check(path, request, x, t, dtype, weight=w, ls=0.1, what="NaN weight, smoothing")
            continue
        # With smoothing an inf weight makes torch's loss inf and its gradient inf (NaN at that
        # class).  Ours: the same gradient; the loss NaN rather than inf (the smoothing sum is
        # formed relative to the row's max, where the max's own term is inf * 0).
        for xx, tt in _calls(path, x, t, dtype):
            wd = w if dtype == torch.float64 else w.float()
            loss, _, grad = _op(path, request, xx, tt, wd, "none", 0.1)
            ref_loss, ref_grad = _reference(xx, tt, wd, "none", 0.1)
            assert not bool(torch.isfinite(loss).any()) and bool(ref_loss.isinf().all())
            assert_close_nan(grad, ref_grad, TOL[dtype], f"grad {path.name} inf weight, smoothing")


# ---- 4. targets -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_most_negative_int64_target_is_out_of_bounds(request, path):
    x, t = _random_rows(path.n * path.s, path.c, seed=1)
    t[0] = -(2**63)
    (xx, tt), = list(_calls(path, x, t, torch.float32))
    for red in ("mean", "none"):
        if path.emulated:
            with pytest.raises(RuntimeError, match="device-side assert"):
                _op(path, request, xx, tt, None, red, 0.0)
        else:
            with pytest.raises(IndexError, match="Target -9223372036854775808 is out of bounds"):
                _op(path, request, xx, tt, None, red, 0.0)


def test_most_negative_int64_target_through_the_api():
    x = torch.randn(3, 10, requires_grad=True)
    t = torch.tensor([1, -(2**63), 2])
    for red in ("mean", "sum", "none"):
        with pytest.raises(IndexError, match="out of bounds"):
            xent_ext.cross_entropy(x, t, reduction=red)
        with pytest.raises(IndexError, match="out of bounds"):
            F.cross_entropy(x, t, reduction=red)  # the behaviour we match
