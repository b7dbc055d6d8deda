"""Options for language-model training: z_loss, softcap, logit_scale, return_lse,
return_z_loss and inplace_backward, each against a reference written in plain torch ops in
float64, alone and combined with weights, label smoothing, ignore_index and every reduction."""

import ctypes
import itertools

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .conftest import DEVICES, DTYPES, TOL, random_logits, random_targets

REDUCTIONS = ["none", "mean", "sum"]


def reference(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              z_loss=0.0, softcap=None, logit_scale=1.0):
    """Loss, z-loss term and lse in float64 from plain torch ops (autograd gives the gradient)."""
    # Masked (-inf) logits stay -inf under every transform (xent_ext's documented semantics).
    masked = torch.isneginf(x)
    y = torch.where(masked, x.double(), x.double() * logit_scale)
    if softcap is not None:
        y = torch.where(masked, y, softcap * torch.tanh(y / softcap))
    w = weight.double() if weight is not None else None
    rows = F.cross_entropy(y, t, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(y, dim=1)
    valid = t != ignore_index
    z_rows = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return rows + z_rows, z_rows, lse
    if reduction == "sum":
        return (rows + z_rows).sum(), z_rows.sum(), lse
    w_t = w[t.clamp(min=0)] if w is not None else torch.ones_like(lse)
    total = torch.where(valid, w_t, torch.zeros_like(w_t)).sum()
    return (rows + z_rows).sum() / total, z_rows.sum() / total, lse


OPTIONS = [
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"logit_scale": 0.5},
    {"z_loss": 1e-2, "softcap": 10.0, "logit_scale": 2.0},
]
COMBOS = [
    {},
    {"weight": True},
    {"label_smoothing": 0.2},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 3},
]


def _inputs(dtype, device, n=17, c=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = random_logits((n, c), dtype, device, generator=g)
    t = random_targets((n,), c, device, ignore_frac=0.2, generator=g)
    t[0] = 0
    x[0, 5] = float("-inf")  # a masked vocabulary entry (not the target: that loss is inf)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.3).to(dtype).to(device)
    return x, t, w


def _check(x, t, w, opts, combo, reduction, inplace=False):
    kw = dict(opts, reduction=reduction)
    kw.update({k: v for k, v in combo.items() if k != "weight"})
    if combo.get("weight"):
        kw["weight"] = w
    if kw.get("ignore_index", -100) >= 0:
        t = torch.where(t == -100, torch.full_like(t, kw["ignore_index"]), t)
    if kw.get("label_smoothing"):
        # Smoothing puts mass on every class: a -inf logit makes the loss infinite.
        x = x.nan_to_num(neginf=-30.0)
    x64 = x.double().requires_grad_()
    ref_loss, ref_z, ref_lse = reference(x64, t, **kw)
    g_out = torch.rand(ref_loss.shape, dtype=torch.float64, device=x.device) + 0.5
    (ref_grad,) = torch.autograd.grad(ref_loss, x64, g_out)

    # A non-leaf copy of the logits, as a model's output would be.
    leaf = x.detach().clone().requires_grad_()
    logits = leaf * 1
    loss, z, lse = xent_ext.cross_entropy(logits, t, return_z_loss=True, return_lse=True,
                                          inplace_backward=inplace, **kw)
    loss.backward(g_out.to(loss.dtype))
    rtol, atol, gtol = TOL[x.dtype]
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(z.double(), ref_z.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)
    gscale = max(ref_grad.abs().max().item(), 1e-3)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=0, atol=gtol * gscale)
    assert not z.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda o: ",".join(o) or "plain")
def test_option_against_float64_reference(device, dtype, opts, combo):
    x, t, w = _inputs(dtype, device)
    for reduction in REDUCTIONS:
        _check(x, t, w, opts, combo, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [{}] + OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("c", [7, 2053])  # one row per lane, and one row at a time
def test_inplace_backward_matches(device, dtype, opts, c):
    x, t, w = _inputs(dtype, device, c=c)
    for combo, reduction in itertools.product(COMBOS, REDUCTIONS):
        _check(x, t, w, opts, combo, reduction, inplace=True)


def test_softcap_keeps_masked_entries_masked():
    x = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([2])
    loss = xent_ext.cross_entropy(x * 1, t, softcap=2.0)
    y = 2.0 * torch.tanh(torch.tensor([0.0, 1.0]) / 2.0)
    expected = torch.logsumexp(y, 0) - y[1]  # the -inf entries take no mass
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert bool((x.grad[0, [1, 3]] == 0).all())


def test_inplace_backward_clobbers_logits_and_saves_memory_of_a_buffer():
    x = torch.randn(8, 50)
    logits = x.clone().requires_grad_() * 1
    before = logits.detach().clone()
    loss = xent_ext.cross_entropy(logits, torch.randint(0, 50, (8,)), inplace_backward=True)
    assert not torch.equal(logits.detach(), before)  # documented: the logits are overwritten
    loss.backward()


def test_inplace_backward_refuses_leaf_and_noncontiguous():
    t = torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="leaf"):
        xent_ext.cross_entropy(torch.randn(4, 10, requires_grad=True), t, inplace_backward=True)
    base = torch.randn(10, 4, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match="contiguous"):
        xent_ext.cross_entropy(base.t(), t, inplace_backward=True)


def test_inplace_backward_other_autograd_use_fails_loudly():
    w = torch.randn(8, 10, requires_grad=True)
    logits = w * 1
    other = (logits * logits).sum()  # saves logits for its backward
    loss = xent_ext.cross_entropy(logits, torch.randint(0, 10, (8,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_without_grad_is_plain():
    x = torch.randn(6, 9)
    t = torch.randint(0, 9, (6,))
    out = xent_ext.cross_entropy(x, t, inplace_backward=True)  # nothing to differentiate
    torch.testing.assert_close(out, F.cross_entropy(x, t))
    assert torch.isfinite(x).all()


def _peak_rss_delta(fn) -> int:
    """Peak resident memory added while fn runs (Linux: reset the high-water mark first)."""
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS:")
    fn()
    return status("VmHWM:") - base


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc (and glibc's malloc_trim) to measure peak memory")
def test_inplace_backward_peak_memory_cpu():
    n, c, hidden = 256, 32768, 8  # 32 MiB of float32 logits from a small linear layer
    nbytes = n * c * 4
    t = torch.randint(0, c, (n,))
    feats = torch.randn(n, hidden)
    weight = torch.randn(hidden, c, requires_grad=True)

    def run(inplace):
        logits = feats @ weight  # its backward allocates nothing of size N x C
        xent_ext.empty_cpu_cache()
        weight.grad = None
        # Hand the allocator's free pages back to the system, so that a buffer allocated now
        # shows as new resident memory instead of reusing pages an earlier test left behind.
        ctypes.CDLL(None).malloc_trim(0)
        return _peak_rss_delta(
            lambda: xent_ext.cross_entropy(logits, t, inplace_backward=inplace).backward())

    # Resident memory is a noisy witness (a freed block of the heap may be reused without new
    # pages; another thread may touch some): the best of three runs of each.  A real extra
    # buffer in the in-place run would show in all three.
    with_buffer = max(run(False) for _ in range(3))
    in_place = min(run(True) for _ in range(3))
    assert with_buffer > 0.8 * nbytes, with_buffer  # the separate gradient buffer shows up
    assert in_place < 0.1 * nbytes, in_place  # logits + O(N) only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [{"z_loss": 1e-3}, {"z_loss": 1e-3, "softcap": 5.0,
                                                     "logit_scale": 0.8}],
                         ids=["z", "z+softcap+scale"])
def test_compile_fullgraph(device, opts):
    torch._dynamo.reset()
    weight = torch.randn(16, 300, device=device)
    feats = torch.randn(12, 16, device=device)
    t = random_targets((12,), 300, device, ignore_frac=0.2)

    def step(w):
        loss, lse = xent_ext.cross_entropy(feats @ w, t, return_lse=True, **opts)
        return loss + 0 * lse.sum()

    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out1 = torch.compile(step, fullgraph=True, backend="aot_eager")(w1)
    out1.backward()
    out2 = step(w2)
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("shape", [(37, 7), (3, 21, 19)])  # short rows, and K-dim: lane kernels
@pytest.mark.parametrize("opts", [
    {"label_smoothing": 0.2, "z_loss": 1e-3, "weight": True, "reduction": "mean"},
    {"logit_scale": 0.7, "label_smoothing": 0.1, "reduction": "sum"},
    {"softcap": 3.0, "logit_scale": 1.3, "z_loss": 1e-2, "weight": True, "reduction": "none"},
], ids=["smooth-z-weight", "scale-smooth", "cap-scale-z-weight"])
def test_lane_kernels_every_option(cpu_isa, shape, opts):
    """The lane kernels compute each row's loss and gradient coefficients in vector form:
    every option that enters them, on every instruction set, with ignored rows."""
    g = torch.Generator().manual_seed(sum(shape))
    x = random_logits(shape, torch.float32, "cpu", generator=g)
    t = random_targets((shape[0],) + shape[2:], shape[1], "cpu", ignore_frac=0.2, generator=g)
    w = torch.rand(shape[1], generator=g) + 0.5
    opts = dict(opts)
    reduction = opts.pop("reduction")
    _check(x, t, w, {}, opts, reduction)


@pytest.mark.parametrize("c", [10, 100, 5000])  # one row per lane, one row at a time, chunks
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_logit_scale_every_path(cpu_isa, dtype, c):
    """A negative scale flips the logits; padding and masked (-inf) entries must stay -inf."""
    g = torch.Generator().manual_seed(c)
    x = random_logits((5, c), dtype, "cpu", generator=g)
    x[1, 3] = float("-inf")
    t = torch.tensor([0, 1, 2, 3, 4])
    _check(x, t, None, {"logit_scale": -1.5}, {}, "none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inplace_backward_peak_memory_cuda():
    n, c, hidden = 1024, 32768, 8  # 128 MiB of float32 logits from a small linear layer
    nbytes = n * c * 4
    t = torch.randint(0, c, (n,), device="cuda")
    feats = torch.randn(n, hidden, device="cuda")
    weight = torch.randn(hidden, c, device="cuda", requires_grad=True)

    def run(inplace):
        logits = feats @ weight
        weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        xent_ext.cross_entropy(logits, t, inplace_backward=inplace).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    with_buffer = run(False)
    in_place = run(True)
    assert with_buffer > 0.8 * nbytes, with_buffer  # the separate gradient buffer shows up
    assert in_place < 0.1 * nbytes, in_place  # logits + O(N) (+ the small weight gradient)
