"""The lesson's point about precision, made visible: where log(softmax(x)) overflows or
underflows to inf / NaN, the fused kernel stays finite and matches the float64 log-sum-exp."""

import pytest
import torch
import torch.nn.functional as F

import xent_ext
from xent_ext.reference import naive_cross_entropy

from .conftest import DEVICES, DTYPES, assert_close_to_reference


def _extreme_rows(dtype, big, device):
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(8, 300, generator=g, dtype=torch.float64) * 2 - 1) * big
    t = torch.randint(0, 300, (8,), generator=g)
    # Make the target far below the max in some rows: softmax underflows to 0 there.
    x[torch.arange(4), t[:4]] = -big
    return x.to(dtype).to(device), t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.float16, 3e4),
                                       (torch.bfloat16, 1e4)], ids=str)
def test_extreme_logits_stay_finite(device, dtype, big):
    x, t = _extreme_rows(dtype, big, device)
    naive = naive_cross_entropy(x.float(), t, reduction="none")
    assert not bool(torch.isfinite(naive).all()), "the naive reference should break here"

    xr = x.detach().requires_grad_()
    ours = xent_ext.cross_entropy(xr, t, reduction="none")
    ours.sum().backward()
    assert bool(torch.isfinite(ours).all()) and bool(torch.isfinite(xr.grad).all())

    x64 = x.double()
    expected = torch.logsumexp(x64, 1) - x64.gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(ours.double(), expected.to(ours.dtype).double(),
                               rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)
    _, lse = xent_ext.cross_entropy(x, t, reduction="none", return_lse=True)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x64, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
def test_rows_with_neg_inf_entries(device, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4099, generator=g, dtype=torch.float64)
    x[:, ::3] = float("-inf")  # masked vocabulary entries
    x[2, :4000] = float("-inf")  # a row that starts with a long masked run
    t = torch.tensor([1, 2, 4001, 4, 5, 7])
    x = x.to(dtype).to(device)
    t = t.to(device)
    xr = x.detach().requires_grad_()
    ours = xent_ext.cross_entropy(xr, t, reduction="none")
    ours.sum().backward()
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    ref.sum().backward()
    assert bool(torch.isfinite(ours).all())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=0, atol=tol)
    assert bool((xr.grad[:, ::3] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_like_torch(device):
    x = torch.randn(4, 50, dtype=torch.float32, device=device)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, :] = float("-inf")
    t = torch.tensor([0, 1, 2, 3], device=device)
    ours = xent_ext.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x, t, reduction="none")
    assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
    torch.testing.assert_close(ours[3], ref[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_reference_rises_within_a_row(cpu_isa, dtype):
    """The CPU row sweep takes exps against a reference that may lag the max by up to 64 and
    rises (rescaling the sum, sweeping the chunk again) when a chunk's max is further above it:
    rows that start far below their max, jump in a later chunk, ramp up across chunks, or
    start with -inf; with the gradient from the kept exps, and split across threads."""
    c = 5000  # three 2048-element chunks
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, c, generator=gen, dtype=torch.float64)
    x[0, 0] = -500.0  # first element far below the max
    x[1, 4500] = 300.0  # a jump in the last chunk
    x[2] = torch.linspace(-200.0, 400.0, c, dtype=torch.float64)  # rises in every chunk
    x[3, :3000] = float("-inf")  # the first chunk all -inf, the reference starts at -inf
    x[4, 0] = float("-inf")
    x[5, 2048] = 100.0  # exactly at a chunk start
    x = x.to(dtype)
    t = torch.tensor([1, 4500, c - 1, 3500, 2, 0])
    for reduction in ("none", "sum"):
        assert_close_to_reference(x, t, reduction=reduction, upstream="random")
    threads = torch.get_num_threads()
    torch.set_num_threads(8)  # fewer rows than threads: each row split into slices
    try:
        assert_close_to_reference(x[:2], t[:2], reduction="none", upstream="random")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(19, 30), (3, 30, 19)], ids=["short-rows", "kdim"])
def test_reference_rises_in_the_lane_kernels(cpu_isa, dtype, shape):
    """The lane kernels take exps against each row's first logit in one pass and sweep the
    block again, against each row's max, when some row's max is more than 64 above it."""
    gen = torch.Generator().manual_seed(3)
    rows_last = (shape[0],) + shape[2:] + (shape[1],)  # each row's classes contiguous
    base = torch.randn(rows_last, generator=gen, dtype=torch.float64)
    x2 = base.view(-1, shape[1])  # (rows, C)
    x2[0, 0] = -500.0  # first logit far below the max
    x2[1, 0] = float("-inf")  # first logit -inf
    x2[2, 17] = 200.0  # a row whose max is far above its first logit
    x2[3, :15] = float("-inf")  # the first half of a row masked
    x = base.movedim(-1, 1).contiguous().to(dtype)  # (N, C) or (N, C, S)
    t = torch.randint(15, shape[1], (shape[0],) + shape[2:], generator=gen)
    for reduction in ("none", "sum"):
        assert_close_to_reference(x, t, reduction=reduction, upstream="random")


def test_vector_exp_accuracy(cpu_isa):
    """The CPU kernels' vector exp: at most 2 ulp from exp in float64 on [-87.3, 88.3], 0 below
    the float32 normal range, NaN for NaN."""
    x = torch.linspace(-87.3, 88.3, 1_000_003, dtype=torch.float32)
    x = torch.cat([x, torch.rand(100_000) * 2 - 1])
    y = xent_ext._C._vec_exp(x).double()
    exact = torch.exp(x.double())
    ulp = (exact.float().nextafter(torch.tensor(float("inf"))).double() - exact.float().double())
    err_ulp = ((y - exact).abs() / ulp).max().item()
    assert err_ulp <= 2.0, err_ulp
    special = torch.tensor([-1000.0, -88.0, float("-inf"), float("nan"), 0.0])
    ys = xent_ext._C._vec_exp(special)
    assert ys[0] == 0 and ys[1] == 0 and ys[2] == 0 and ys[3].isnan() and ys[4] == 1


def test_vector_exp_of_the_sweeps_accuracy(cpu_isa):
    """The exp of the row sweeps (table + short polynomial on AVX-512): at most 2 ulp from exp
    in float64 on [-87.3, 88], 0 below the float32 normal range, NaN for NaN (any payload)."""
    x = torch.linspace(-87.3, 88.0, 1_000_003, dtype=torch.float32)
    x = torch.cat([x, torch.rand(100_000) * 2 - 1, -torch.rand(100_000) * 20])
    y = xent_ext._C._vec_exp_fast(x).double()
    exact = torch.exp(x.double())
    ulp = (exact.float().nextafter(torch.tensor(float("inf"))).double() - exact.float().double())
    err_ulp = ((y - exact).abs() / ulp).max().item()
    assert err_ulp <= 2.0, err_ulp
    nans = torch.tensor([0x7FC00000, 0x7FC00010, 0xFFC01230, 0x7F800001],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.cat([torch.tensor([-1000.0, -88.0, float("-inf"), 0.0]), nans])
    ys = xent_ext._C._vec_exp_fast(special)
    assert ys[0] == 0 and ys[1] == 0 and ys[2] == 0 and ys[3] == 1
    assert ys[4:].isnan().all()


def test_vector_exp_float64_accuracy(cpu_isa):
    """The float64 vector exp: within 2 ulp of exp in float64 on [-708, 700] (torch's exp
    itself is within about 1 ulp, so the bound is against a difference of the two), 0 below
    the normal range, NaN for NaN."""
    x = torch.cat([torch.linspace(-708.0, 700.0, 1_000_003, dtype=torch.float64),
                   torch.rand(200_000, dtype=torch.float64) * 2 - 1,
                   -torch.rand(200_000, dtype=torch.float64) * 30])
    y = xent_ext._C._vec_exp_f64(x)
    exact = torch.exp(x)
    ulp = exact.nextafter(torch.tensor(float("inf"), dtype=torch.float64)) - exact
    err_ulp = ((y - exact).abs() / ulp).max().item()
    assert err_ulp <= 2.0, err_ulp
    special = torch.tensor([-1000.0, -709.0, float("-inf"), float("nan"), 0.0],
                           dtype=torch.float64)
    ys = xent_ext._C._vec_exp_f64(special)
    assert ys[0] == 0 and ys[1] == 0 and ys[2] == 0 and ys[3].isnan() and ys[4] == 1


def test_vector_log_accuracy(cpu_isa):
    """The CPU kernels' vector log (the log-sum-exp of short rows): at most 1 ulp from log in
    float64 over the positive normal floats, NaN for NaN."""
    x = torch.cat([torch.logspace(-37.9, 38.5, 1_000_003, dtype=torch.float64).float(),
                   1 + torch.rand(200_000) * 63, torch.tensor([1.0, 2.0, 0.5, 1.4142135])])
    y = xent_ext._C._vec_log(x).double()
    exact = torch.log(x.double())
    ulp = (exact.float().abs().nextafter(torch.tensor(float("inf"))).double()
           - exact.float().abs().double())
    err_ulp = ((y - exact).abs() / ulp).max().item()
    assert err_ulp <= 1.0, err_ulp
    assert xent_ext._C._vec_log(torch.tensor([float("nan")])).isnan().all()
    assert xent_ext._C._vec_log(torch.tensor([1.0]))[0] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [10, 100, 3000])
def test_nan_first_logit_poisons_the_row(device, dtype, c):
    x = torch.randn(3, c, dtype=torch.float64).to(dtype).to(device)
    x[0, 0] = float("nan")
    t = torch.tensor([1, 2, 3], device=device)
    ours = xent_ext.cross_entropy(x, t, reduction="none")
    assert bool(ours[0].isnan()) and bool(torch.isfinite(ours[1:]).all())
