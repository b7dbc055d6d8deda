"""xent_ext.linear_cross_entropy against F.cross_entropy(F.linear(x, W, b), t) in float64:
every option alone and combined, every dtype, odd sizes, chunks that do not divide N, ignored
rows, empty batches, leading dimensions, and the argument errors."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .linear_support import assert_close, assert_grads_close, make_case, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OPTIONS = {
    "plain": {},
    "class_weight": {"class_weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "logit_scale": {"logit_scale": 0.7},
    "combined": {"class_weight": True, "label_smoothing": 0.2, "z_loss": 1e-3,
                 "softcap": 5.0, "logit_scale": 1.3},
}


def _run(x, w, t, b, cw, upstream=None, **options):
    xs = x.detach().requires_grad_()
    ws = w.detach().requires_grad_()
    bs = b.detach().requires_grad_() if b is not None else None
    out = xent_ext.linear_cross_entropy(xs, ws, t, bs, class_weight=cw, **options)
    loss = out[0] if isinstance(out, tuple) else out
    g = torch.ones_like(loss) if upstream is None else upstream
    wrt = [a for a in (xs, ws, bs) if a is not None]
    return out, loss, torch.autograd.grad(loss, wrt, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(dtype, reduction, option):
    opts = dict(OPTIONS[option])
    use_cw = opts.pop("class_weight", False)
    seed = zlib.crc32(f"{dtype}{reduction}{option}".encode()) % 10_000
    # Odd H and V; 37 rows in chunks of 16: the last chunk is partial.
    x, w, t, b, cw = make_case(37, 13, 29, dtype, seed, class_weight=use_cw)
    upstream = None
    if reduction == "none":  # an incoming gradient that is not all ones
        upstream = (torch.rand(37, generator=torch.Generator().manual_seed(seed)) + 0.5
                    ).to(dtype)
    _, loss, grads = _run(x, w, t, b, cw, upstream, reduction=reduction, chunk_size=16, **opts)
    _, ref_loss, ref_grads = reference(x, w, t, b, class_weight=cw, reduction=reduction,
                                       upstream=upstream, **opts)
    assert loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_grads_close(grads, ref_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_no_bias_leading_dims_and_default_chunk(dtype):
    x, w, t, _, _ = make_case((3, 5), 16, 40, dtype, 3, bias=False)
    for reduction in ("none", "mean"):
        out, loss, grads = _run(x, w, t, None, None, reduction=reduction)
        _, ref_loss, ref_grads = reference(x, w, t, None, reduction=reduction)
        assert loss.shape == t.shape if reduction == "none" else loss.dim() == 0
        assert grads[0].shape == x.shape
        assert_close(loss, ref_loss, dtype, "loss")
        assert_grads_close(grads, ref_grads, dtype, names=("input", "weight"))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunk_sizes_agree(chunk):
    x, w, t, b, _ = make_case(50, 9, 31, torch.float64, 11)
    _, loss, grads = _run(x, w, t, b, None, chunk_size=chunk)
    _, ref_loss, ref_grads = reference(x, w, t, b)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_grads_close(grads, ref_grads, torch.float64)


def test_chunk_bytes_sets_rows():
    from xent_ext._linear_plan import MIN_CHUNK_ROWS, chunk_rows

    assert chunk_rows(10_000, 1000, torch.float32, None, 4 * 1000 * 512) == 512
    assert chunk_rows(10_000, 1000, torch.float32, None, 1) == MIN_CHUNK_ROWS
    assert chunk_rows(100, 1000, torch.float32, None, None) == 100
    assert chunk_rows(100, 1000, torch.float32, 7, None) == 7
    x, w, t, b, _ = make_case(300, 8, 20, torch.float64, 5)
    _, loss, grads = _run(x, w, t, b, None, chunk_bytes=64)
    _, ref_loss, ref_grads = reference(x, w, t, b)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_grads_close(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    x, w, t, b, _ = make_case(12, 6, 10, torch.float64, 2, ignore_frac=0.0)
    t[:] = -100
    _, loss, grads = _run(x, w, t, b, None, reduction=reduction, chunk_size=5)
    _, ref_loss, ref_grads = reference(x, w, t, b, reduction=reduction)
    assert_close(loss, ref_loss, torch.float64, "loss")  # NaN for 'mean', as torch
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, t, b, _ = make_case(0, 6, 10, torch.float32, 2)
    _, loss, grads = _run(x, w, t, b, None, reduction=reduction)
    ref = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert grads[0].shape == (0, 6) and not grads[1].any() and not grads[2].any()


def test_custom_ignore_index_and_uint8_target():
    x, w, _, b, _ = make_case(20, 5, 7, torch.float64, 4)
    t = torch.randint(0, 7, (20,), dtype=torch.uint8)
    t[::3] = 3
    _, loss, grads = _run(x, w, t, b, None, ignore_index=3, chunk_size=6)
    _, ref_loss, ref_grads = reference(x, w, t.long(), b, ignore_index=3)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_grads_close(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_and_z_loss(dtype, reduction):
    x, w, t, b, cw = make_case((2, 9), 12, 23, dtype, 8, class_weight=True)
    opts = dict(class_weight=cw, reduction=reduction, z_loss=1e-2, softcap=4.0,
                return_z_loss=True, return_lse=True, chunk_size=4)
    loss, z, lse = xent_ext.linear_cross_entropy(x, w, t, b, **opts)
    logits = F.linear(x.double(), w.double(), b.double())
    r_loss, r_z, r_lse = xent_ext.cross_entropy(
        logits.reshape(-1, 23), t.reshape(-1), weight=cw.double(), reduction=reduction,
        z_loss=1e-2, softcap=4.0, return_z_loss=True, return_lse=True)
    assert lse.shape == t.shape and lse.dtype == (torch.float64 if dtype == torch.float64
                                                   else torch.float32)
    assert_close(lse, r_lse.reshape(t.shape), dtype, "lse")  # ignored rows included
    assert_close(z, r_z.reshape(z.shape), dtype, "z term")
    assert_close(loss, r_loss.reshape(loss.shape), dtype, "loss")


def test_grad_for_some_inputs_only():
    x, w, t, b, _ = make_case(30, 7, 11, torch.float64, 9)
    _, _, ref_grads = reference(x, w, t, b)
    ws = w.detach().requires_grad_()
    loss = xent_ext.linear_cross_entropy(x, ws, t, b, chunk_size=8)  # only the weight
    loss.backward()
    torch.testing.assert_close(ws.grad, ref_grads[1])
    xs = x.detach().requires_grad_()
    loss = xent_ext.linear_cross_entropy(xs, w, t, b, chunk_size=8, reduction="none")
    loss.sum().backward()
    _, _, ref_none = reference(x, w, t, b, reduction="none")
    torch.testing.assert_close(xs.grad, ref_none[0])
    with torch.no_grad():
        out = xent_ext.linear_cross_entropy(xs, ws, t, b)
    assert not out.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_through_retained_graph(reduction):
    x, w, t, b, _ = make_case(25, 6, 9, torch.float64, 12)
    xs, ws, bs = (a.detach().requires_grad_() for a in (x, w, b))
    loss = xent_ext.linear_cross_entropy(xs, ws, t, bs, reduction=reduction, chunk_size=7)
    g1 = torch.full_like(loss, 2.0)
    g2 = torch.full_like(loss, -0.5)
    first = torch.autograd.grad(loss, (xs, ws, bs), g1, retain_graph=True)
    second = torch.autograd.grad(loss, (xs, ws, bs), g2)
    _, _, ref1 = reference(x, w, t, b, reduction=reduction, upstream=g1)
    _, _, ref2 = reference(x, w, t, b, reduction=reduction, upstream=g2)
    for a, r in zip(first + second, ref1 + ref2, strict=True):
        torch.testing.assert_close(a, r)


def test_double_backward_raises():
    x, w, t, b, _ = make_case(5, 4, 6, torch.float64, 1)
    xs = x.detach().requires_grad_()
    loss = xent_ext.linear_cross_entropy(xs, w, t, b)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, xs, create_graph=True)


def test_module_swaps_head_and_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    criterion = xent_ext.LinearCrossEntropyLoss.from_linear(head, label_smoothing=0.1,
                                                            chunk_size=8)
    assert criterion.weight is head.weight and criterion.bias is head.bias
    hidden = torch.randn(4, 6, 16, requires_grad=True)
    target = torch.randint(0, 50, (4, 6))
    loss = criterion(hidden, target)
    loss.backward()
    grads = [hidden.grad, head.weight.grad, head.bias.grad]
    for p in (hidden, head.weight, head.bias):
        p.grad = None
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(head(hidden).flatten(0, 1),
                                                         target.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(g, r)
    own = xent_ext.LinearCrossEntropyLoss(16, 50, bias=False, class_weight=torch.ones(50))
    assert own.bias is None and "class_weight" in own.state_dict()
    assert isinstance(own.weight, torch.nn.Parameter)


def test_argument_errors():
    x, w, t, b, _ = make_case(4, 5, 6, torch.float32, 0)
    lce = xent_ext.linear_cross_entropy
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        lce(x, w[:, :4], t)
    with pytest.raises(RuntimeError, match="weight"):
        lce(x, w.double(), t)
    with pytest.raises(RuntimeError, match="bias"):
        lce(x, w, t, b[:3])
    with pytest.raises(ValueError, match="batch_size"):
        lce(x, w, t[:3])
    with pytest.raises(RuntimeError, match="target dtype"):
        lce(x, w, t.int())
    with pytest.raises(NotImplementedError, match="probability"):
        lce(x, w, torch.rand(4))
    with pytest.raises(RuntimeError, match="class_weight"):
        lce(x, w, t, class_weight=torch.ones(6, requires_grad=True))
    with pytest.raises(RuntimeError, match="6 classes"):
        lce(x, w, t, class_weight=torch.ones(5))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        lce(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        lce(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        lce(x, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        lce(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="not both"):
        lce(x, w, t, chunk_size=4, chunk_bytes=1 << 20)
    with pytest.raises(NotImplementedError, match="floating point"):
        lce(x.long(), w.long(), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [8, 1000], ids=["chunks", "one_chunk"])
def test_half_weight_gradient_paths(dtype, chunk):
    # One chunk: the weight gradient is one GEMM in the weight dtype; several: float32
    # accumulation of per-slice GEMMs (CPU).
    x, w, t, b, _ = make_case(40, 24, 600, dtype, 17)
    _, loss, grads = _run(x, w, t, b, None, chunk_size=chunk)
    _, ref_loss, ref_grads = reference(x, w, t, b)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_grads_close(grads, ref_grads, dtype)
