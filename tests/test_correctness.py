"""Loss and gradient against F.cross_entropy (float64 as the judge) and the naive
log(softmax) reference: every dtype, every reduction, odd and large class counts, ignore_index
scattered or everywhere, and every vectorised CPU path."""

import sys

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from xent_ext.reference import naive_cross_entropy

from .conftest import DEVICES, DTYPES, assert_close_to_reference, random_logits, random_targets

VOCABS = [1, 2, 3, 17, 1000, 32001, 70000]
ROWS = [0, 1, 7, 1024]
REDUCTIONS = ["none", "mean", "sum"]


def _grid():
    for v in VOCABS:
        for n in ROWS:
            if n * v > 8_000_000:  # keep the float64 reference affordable
                continue
            yield n, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", list(_grid()))
def test_matches_torch(device, dtype, n, v):
    gen = torch.Generator().manual_seed(n * 100003 + v)
    x = random_logits((n, v), dtype, device, generator=gen)
    t = random_targets((n,), v, device, ignore_frac=0.2, generator=gen)
    for reduction in REDUCTIONS:
        assert_close_to_reference(x, t, reduction=reduction,
                                  upstream="random" if reduction == "none" else "ones")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("v", [1, 5, 16, 17, 2047, 2048, 2049, 32001])
def test_every_cpu_path(cpu_isa, dtype, v):
    """Each instruction set, at sizes around its vector width and the 2048-element chunk."""
    gen = torch.Generator().manual_seed(v)
    x = random_logits((9, v), dtype, "cpu", generator=gen)
    t = random_targets((9,), v, "cpu", ignore_frac=0.2, generator=gen)
    assert xent_ext.cpu_isa() == cpu_isa
    for reduction in REDUCTIONS:
        assert_close_to_reference(x, t, reduction=reduction, upstream="random")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 300, 37), (4, 9, 16, 2)])
def test_every_cpu_path_kdim(cpu_isa, dtype, shape):
    """K-dim inputs: rows (n, s) one per SIMD lane, classes strided by S."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = random_logits(shape, dtype, "cpu", generator=gen)
    t = random_targets((shape[0],) + shape[2:], shape[1], "cpu", ignore_frac=0.2, generator=gen)
    for reduction in REDUCTIONS:
        assert_close_to_reference(x, t, reduction=reduction, upstream="random",
                                  label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored(device, dtype):
    x = random_logits((6, 11), dtype, device)
    t = torch.full((6,), -100, device=device)
    for reduction in REDUCTIONS:
        r = assert_close_to_reference(x, t, reduction=reduction)
        loss, grad = r["ours"]
        assert bool((grad == 0).all())
        if reduction == "mean":
            assert loss.isnan()  # 0 / 0, as torch


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index(device):
    x = random_logits((50, 9), torch.float32, device)
    t = random_targets((50,), 9, device)
    for ii in (0, 4, 8, -1, -5):
        for reduction in REDUCTIONS:
            assert_close_to_reference(x, t, reduction=reduction, ignore_index=ii)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_naive_reference_agrees_on_ordinary_logits(device, dtype):
    x = random_logits((64, 257), dtype, device, scale=2.0)
    t = random_targets((64,), 257, device)
    ours = xent_ext.cross_entropy(x, t, reduction="none").double()
    naive = naive_cross_entropy(x.double(), t, reduction="none")
    rtol, atol, _ = __import__("tests.conftest", fromlist=["TOL"]).TOL[dtype]
    torch.testing.assert_close(ours, naive, rtol=rtol, atol=atol)


def test_uint8_targets_like_torch():
    x = random_logits((20, 7), torch.float32, "cpu")
    t = torch.randint(0, 7, (20,), dtype=torch.uint8)
    torch.testing.assert_close(xent_ext.cross_entropy(x, t), F.cross_entropy(x, t))


def test_noncontiguous_input():
    base = random_logits((40, 30), torch.float32, "cpu")
    x = base.t()  # (30, 40), strided
    t = random_targets((30,), 40, "cpu")
    assert not x.is_contiguous()
    assert_close_to_reference(x, t, reduction="none", upstream="random")
    x2 = random_logits((20, 64), torch.bfloat16, "cpu")[:, 3:50]  # unaligned row starts
    assert_close_to_reference(x2, random_targets((20,), 47, "cpu"), reduction="sum")


def test_no_grad_path_skips_gradient():
    x = random_logits((8, 100), torch.float32, "cpu")
    t = random_targets((8,), 100, "cpu")
    with torch.no_grad():
        loss = xent_ext.cross_entropy(x.requires_grad_(), t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t))


def test_backward_scales_by_upstream_gradient():
    x = random_logits((16, 50), torch.float32, "cpu").requires_grad_()
    t = random_targets((16,), 50, "cpu")
    (g1,) = torch.autograd.grad(xent_ext.cross_entropy(x, t) * 3.5, x)
    (g2,) = torch.autograd.grad(F.cross_entropy(x, t) * 3.5, x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_repeated_backward_is_right(reduction):
    """The first backward scales the saved gradient in place; later ones through a retained
    graph must neither scale it twice nor alter the tensor the first one returned."""
    x = random_logits((4, 10), torch.float32, "cpu").requires_grad_()
    t = random_targets((4,), 10, "cpu")
    loss = xent_ext.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x, t, reduction=reduction)
    outs = []
    for k in (2.0, 3.0, 1.0):
        g_out = torch.full_like(loss, k)
        (g,) = torch.autograd.grad(loss, x, g_out, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, x, g_out, retain_graph=True)
        torch.testing.assert_close(g, g_ref)
        outs.append((g, g_ref.clone()))
    for g, g_ref in outs:  # earlier results unchanged
        torch.testing.assert_close(g, g_ref)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.autograd.grad(ref.sum(), x)[0])


def test_repeated_backward_after_zero_upstream_is_exact():
    """A first incoming gradient of exactly 0 for a row: the next backward through the retained
    graph is still torch's (the buffer is not rescaled; the kernel runs again)."""
    x = random_logits((3, 5), torch.float32, "cpu").requires_grad_()
    t = random_targets((3,), 5, "cpu")
    loss = xent_ext.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x, t, reduction="none")
    for g_out in (torch.tensor([1.0, 0.0, 2.0]), torch.ones(3), torch.tensor([0.0, 0.5, 0.0])):
        (g,) = torch.autograd.grad(loss, x, g_out, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, x, g_out, retain_graph=True)
        torch.testing.assert_close(g, g_ref)


def test_lse_is_float32_and_matches():
    x = random_logits((9, 333), torch.bfloat16, "cpu")
    t = random_targets((9,), 333, "cpu")
    loss, lse = xent_ext.cross_entropy(x, t, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (9,)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double(), 1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3])
def test_few_long_rows_split_across_threads(cpu_isa, dtype, rows):
    """Fewer rows than threads: each row is split into slices (partial max / sum-exp, combine,
    gradient given the log-sum-exp).  Targets fall in different slices; one row is ignored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        c = 20011
        gen = torch.Generator().manual_seed(rows)
        x = random_logits((rows, c), dtype, "cpu", generator=gen)
        t = torch.tensor([5, c - 1, -100][:rows])
        w = (torch.rand(c, generator=gen) + 0.5).to(dtype)
        for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
            for reduction in REDUCTIONS:
                assert_close_to_reference(x, t, reduction=reduction, upstream="random", **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP flags are set on Linux")
def test_cpu_kernels_run_on_every_thread():
    """The CPU kernels split rows with at::parallel_for, a header template: compiled without
    OpenMP it silently runs on one thread.  Ask the extension's own code how many it used."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert xent_ext._C._parallel_threads(64) == 2
    finally:
        torch.set_num_threads(threads)
