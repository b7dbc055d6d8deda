"""CUDA correctness: xent_ext.cross_entropy on the GPU against F.cross_entropy in float64, for
every kernel regime (csrc/cuda/xent_kernels.cuh) and option.  Skipped without a GPU; the CPU
emulation of the same kernels runs everywhere (tests/test_cuda_static.py).

XENT_CUDA_REGIME forces a regime (group, regs, kdim, block, block_scalar, split, strided); one
that cannot run a shape falls back to the automatic choice, so every forced case is still checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import xent_ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# (loss rtol/atol, grad atol relative to the largest reference gradient entry)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REDUCTIONS = ["none", "mean", "sum"]


@pytest.fixture(autouse=True)
def _cuda_ready():
    if not xent_ext.has_cuda():
        pytest.skip("xent_ext was built without CUDA")
    yield


@pytest.fixture
def regime(request, monkeypatch):
    """Sets XENT_CUDA_REGIME for one test (read by the extension at every call)."""
    name = getattr(request, "param", "auto")
    monkeypatch.setenv("XENT_CUDA_REGIME", name)
    return name


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(shape, dtype, seed=0, scale=3.0):
    x = torch.randn(shape, dtype=torch.float64, generator=_gen(seed)) * scale
    return x.to(dtype).to(DEV)


def class_targets(n_shape, c, seed=1, ignore_frac=0.0, ignore_index=-100):
    t = torch.randint(0, c, n_shape, generator=_gen(seed))
    if ignore_frac:
        t[torch.rand(n_shape, generator=_gen(seed + 1)) < ignore_frac] = ignore_index
    return t.to(DEV)


def prob_targets(shape, dtype, seed=2):
    q = torch.softmax(torch.randn(shape, dtype=torch.float64, generator=_gen(seed)), dim=1)
    return q.to(dtype).to(DEV)


def class_weight(c, dtype, seed=3):
    return (torch.rand(c, dtype=torch.float64, generator=_gen(seed)) + 0.5).to(dtype).to(DEV)


def _close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    both_nan = actual.isnan() & expected.isnan()
    same_inf = actual.isinf() & (actual == expected)
    ok = both_nan | same_inf | ((actual - expected).abs() <= atol + rtol * expected.abs())
    if not bool(ok.all()):
        diff = (actual - expected).abs().nan_to_num(float("inf"))
        bad = (~ok).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3e} (atol {atol:.1e}, "
                             f"rtol {rtol:.1e}); first bad indices {bad}")


def check(x, target, upstream="ones", **kw):
    """Loss and input gradient of xent_ext on CUDA against F.cross_entropy in float64 on the
    same values; returns ours."""
    xo = x.detach().clone().requires_grad_(True)
    loss = xent_ext.cross_entropy(xo, target, **kw)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in kw.items()}
    t64 = target.double() if target.is_floating_point() else target
    ref = F.cross_entropy(x64, t64, **kw64)
    if upstream == "ones":
        g_out = torch.ones_like(loss)
    else:
        g_out = (torch.rand(loss.shape, generator=_gen(9), dtype=torch.float64) + 0.5)
        g_out = g_out.to(loss.dtype).to(DEV)
    (grad,) = torch.autograd.grad(loss, xo, g_out)
    (ref_grad,) = torch.autograd.grad(ref, x64, g_out.double())
    assert loss.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    tol = TOL[x.dtype]
    lscale = max(1.0, ref.detach().abs().nan_to_num(0).max().item()) if ref.numel() else 1.0
    _close(loss, ref.detach(), tol, tol * lscale, "loss")
    gscale = max(ref_grad.abs().max().item(), 1e-30) if ref_grad.numel() else 1.0
    # float16 holds gradients of 1e-6 and below (huge C) as subnormals, 6e-8 apart.
    floor = 2**-23 if x.dtype == torch.float16 else 0.0
    _close(grad, ref_grad, 0.0, max(tol * gscale, floor), "grad")
    return loss, grad


# Shapes by regime (csrc/cuda/plan.cuh).  Automatic choice on an H100 / A100: up to 256
# 16-byte items (2048 16-bit classes) -> group (2 to 32 lanes per row); longer rows with class
# indices -> regs (the row in registers; on sm_90 split over a thread-block cluster, e.g.
# 65536 and 262147 classes), probability targets -> block; on an A100 rows beyond one block's
# registers -> block, few of them -> split.
SHAPES = {
    "tiny": (64, 3),
    "tiny8": (50, 10),
    "small": (64, 100),
    "strided-max": (300, 128),
    "group-min": (33, 129),
    "small-odd": (37, 257),
    "group-max": (40, 1000),
    "medium": (24, 4096),
    "unaligned-32001": (12, 32001),
    "large-64k": (4, 65536),  # few rows: split; forced block: one row per block
    "huge-few-rows": (2, 262147),  # split, odd C
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_index_targets(shape, dtype, reduction):
    n, c = SHAPES[shape]
    x = logits((n, c), dtype, seed=c)
    t = class_targets((n,), c, ignore_frac=0.2)
    check(x, t, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_lse(shape, dtype):
    n, c = SHAPES[shape]
    x = logits((n, c), dtype, seed=c + 4)
    _, lse = xent_ext.cross_entropy(x, class_targets((n,), c), return_lse=True)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = torch.logsumexp(x.double(), dim=1)
    _close(lse, ref, TOL[dtype], TOL[dtype], "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_weights_smoothing_ignore_index(shape, dtype):
    n, c = SHAPES[shape]
    x = logits((n, c), dtype, seed=c + 1)
    t = class_targets((n,), c, ignore_frac=0.3, ignore_index=c // 2 if c > 2 else -1)
    w = class_weight(c, dtype)
    for reduction in REDUCTIONS:
        check(x, t, weight=w, label_smoothing=0.25, ignore_index=c // 2 if c > 2 else -1,
              reduction=reduction, upstream="random")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_probability_targets(shape, dtype):
    n, c = SHAPES[shape]
    x = logits((n, c), dtype, seed=c + 2)
    q = prob_targets((n, c), dtype)
    w = class_weight(c, dtype)
    for kw in (dict(), dict(weight=w, label_smoothing=0.25, reduction="sum"),
               dict(reduction="none")):
        check(x, q, **kw)


@pytest.mark.parametrize("regime", ["group", "regs", "block", "block_scalar", "split",
                                    "strided"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("c", [7, 300, 1000, 5000, 40001])
def test_forced_regimes(regime, dtype, c):
    n = 6
    x = logits((n, c), dtype, seed=c + 3)
    t = class_targets((n,), c, ignore_frac=0.2)
    check(x, t, label_smoothing=0.1, weight=class_weight(c, dtype))
    check(x, prob_targets((n, c), dtype), reduction="none")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(4, 21, 8, 9), (2, 5, 3), (3, 1000, 7), (1, 3, 1, 1)],
                         ids=str)
def test_k_dim_inputs(shape, dtype):
    x = logits(shape, dtype, seed=sum(shape))
    n, c = shape[0], shape[1]
    t = class_targets((n,) + shape[2:], c, ignore_frac=0.1)
    check(x, t)
    check(x, t, weight=class_weight(c, dtype), label_smoothing=0.25, reduction="none")
    check(x, prob_targets(shape, dtype), reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_unaligned_input_pointer(dtype):
    """Rows starting off a 16-byte boundary (a view into a larger buffer): the gradient buffer
    is aligned, so the kernels fall back to scalar accesses."""
    n, c = 8, 3000
    flat = logits((n * c + 1,), dtype, seed=4)
    x = flat[1:].view(n, c)
    check(x, class_targets((n,), c))
    check(x, prob_targets((n, c), dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("c", [10, 5000])
def test_no_rows(reduction, c):
    x = torch.zeros((0, c), device=DEV, requires_grad=True)
    t = torch.zeros((0,), dtype=torch.long, device=DEV)
    loss = xent_ext.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x.detach(), t, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.equal(loss.isnan(), ref.isnan())
    loss.sum().backward()
    assert x.grad.shape == x.shape


def test_all_ignored_mean_is_nan():
    x = logits((5, 3000), torch.float32, seed=5).requires_grad_()
    t = torch.full((5,), -100, device=DEV)
    loss = xent_ext.cross_entropy(x, t)
    assert loss.isnan()
    loss.backward()
    assert bool((x.grad == 0).all())


@pytest.mark.parametrize("c", [50, 700, 3001, 70001])
def test_special_values_like_torch(c):
    x = logits((6, c), torch.float32, seed=6)
    x[0, 3] = float("nan")
    x[1, 0] = float("nan")
    x[2, :] = float("-inf")
    x[3, c // 2] = float("inf")
    x[4, ::3] = float("-inf")
    t = class_targets((6,), c)
    t[4] = 1
    ours = xent_ext.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x.double(), t, reduction="none")
    assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
    torch.testing.assert_close(ours[4:].double(), ref[4:], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_target_gradient_rounded_once(dtype):
    """p close to 1 at the target: p - 1 must be computed in float and rounded once."""
    n, c = 4, 4096
    x = torch.zeros((n, c), dtype=dtype, device=DEV)
    t = torch.arange(n, device=DEV)
    x[torch.arange(n), t] = 16.0  # p_t - 1 = -4.6e-4: 0 once p_t is rounded to 16 bits
    xo = x.clone().requires_grad_()
    xent_ext.cross_entropy(xo, t, reduction="sum").backward()
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="sum").backward()
    exact = x64.grad[torch.arange(n), t]
    ours = xo.grad[torch.arange(n), t].double()
    assert bool(((ours - exact).abs() <= exact.abs() * 2**-6).all()), (ours, exact)
    others = xo.grad.double() - x64.grad
    others[torch.arange(n), t] = 0
    assert others.abs().max().item() <= 1e-7


@pytest.mark.parametrize("c", [100, 3000, 100003])
def test_extension_options_match_cpu(c):
    """softcap, logit_scale, z_loss: the CPU op in float64 defines them."""
    n = 4
    x = logits((n, c), torch.float32, seed=7)
    t = class_targets((n,), c, ignore_frac=0.25)
    q = prob_targets((n, c), torch.float32)
    for target in (t, q):
        for kw in (dict(softcap=5.0, logit_scale=0.7, z_loss=1e-3),
                   dict(softcap=3.0, label_smoothing=0.25, reduction="none"),
                   dict(logit_scale=-1.5, reduction="sum", z_loss=1e-2)):
            xo = x.clone().requires_grad_()
            loss = xent_ext.cross_entropy(xo, target, **kw)
            loss.sum().backward()
            xc = x.detach().cpu().double().requires_grad_()
            tc = target.cpu().double() if target.is_floating_point() else target.cpu()
            ref = xent_ext.cross_entropy(xc, tc, **kw)
            ref.sum().backward()
            torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=2e-5, atol=2e-5)
            gmax = xc.grad.abs().max().item()
            torch.testing.assert_close(xo.grad.cpu().double(), xc.grad, rtol=0, atol=2e-5 * gmax)


def test_no_host_synchronisation():
    """Forward and backward never wait for the device (CUDA graphs, torch.compile)."""
    cases = [((64, 100), torch.bfloat16), ((8, 32001), torch.bfloat16),
             ((2, 131072), torch.float32)]
    for (n, c), dtype in cases:
        x = logits((n, c), dtype, seed=8).requires_grad_()
        t = class_targets((n,), c, ignore_frac=0.1)
        w = class_weight(c, dtype)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = xent_ext.cross_entropy(x, t, weight=w, label_smoothing=0.1)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", [(64, 100), (200, 32768), (16, 32768), (2, 131072)], ids=str)
def test_cuda_graph_capture(shape):
    n, c = shape
    x = logits((n, c), torch.bfloat16, seed=9).requires_grad_()
    t = class_targets((n,), c)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture
            x.grad = None
            xent_ext.cross_entropy(x, t).backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        loss = xent_ext.cross_entropy(x, t)
        loss.backward()
    with torch.no_grad():
        x.copy_(logits((n, c), torch.bfloat16, seed=10))
    g.replay()
    torch.cuda.synchronize()
    ref = F.cross_entropy(x.detach().double(), t)
    torch.testing.assert_close(loss.double(), ref, rtol=1.6e-2, atol=1.6e-2)


ASSERT_SCRIPT = textwrap.dedent("""
    import sys, torch, xent_ext
    shape, bad = eval(sys.argv[1]), int(sys.argv[2])
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]), device="cuda")
    t.view(-1)[-1] = bad
    loss = xent_ext.cross_entropy(x, t)
    torch.cuda.synchronize()
    print("NO ERROR", loss.item())
""")


@pytest.mark.parametrize("shape, bad", [((8, 100), -5), ((8, 5000), "C"), ((2, 70000), -1000),
                                        ((4, 6, 5), "C"), ((2, 700, 3), -5)], ids=str)
def test_out_of_range_target_device_assert(shape, bad):
    """An out-of-range class index trips a device-side assertion (as PyTorch on CUDA) instead
    of a silent result, in every regime (group, block, split, strided, transposed K-dim); run
    in a subprocess because it poisons the CUDA context."""
    bad = shape[1] if bad == "C" else bad
    proc = subprocess.run([sys.executable, "-c", ASSERT_SCRIPT, repr(shape), str(bad)],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "XENT_CUDA_REGIME"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert "device-side assert" in out or "Target is out of bounds" in out, out[-2000:]


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.skipif(not torch.cuda.is_available() or _free_gib() < 14,
                    reason="needs about 14 GiB of free GPU memory")
def test_large_bf16_beyond_int32_offsets():
    """N * V >= 2^31 elements: rows past the 32-bit offset range must be read and written where
    they are (64-bit row offsets)."""
    n, v = 16400, 131072
    assert n * v >= 2**31
    x = torch.empty((n, v), dtype=torch.bfloat16, device=DEV)
    x.normal_(generator=torch.Generator(device=DEV).manual_seed(0))
    t = torch.randint(0, v, (n,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    x.requires_grad_(True)
    loss = xent_ext.cross_entropy(x, t, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=DEV)
    assert int(rows[-1]) * v >= 2**31
    x64 = x.detach()[rows].double().requires_grad_()
    ref = F.cross_entropy(x64, t[rows], reduction="none")
    ref.sum().backward()
    _close(loss[rows], ref.detach(), 1.6e-2, 1.6e-2, "loss")
    _close(grad[rows], x64.grad, 0.0, 1.6e-2 * x64.grad.abs().max().item(), "grad")
    del grad, x
