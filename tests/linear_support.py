"""Shared helpers of the linear + cross-entropy tests: data, the float64 judge, tolerances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import xent_ext

# (loss rtol/atol, gradient atol relative to the largest reference entry).  The logits go
# through a GEMM in the input dtype (rounded once, as F.linear's), so half types sit at a few
# ulps of the logits; float32 at the GEMM's accumulation over H.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# Options of F.cross_entropy itself are judged by F.cross_entropy; the language-model options
# by xent_ext.cross_entropy in float64 (itself tested against torch and the composite).
TORCH_OPTIONS = ("class_weight", "label_smoothing", "ignore_index")


def make_case(n_shape, h, v, dtype, seed, bias=True, ignore_frac=0.2, class_weight=False,
              device="cpu"):
    """Hidden states (..., H), a head (V, H) scaled so that logits are O(1..3), targets with
    a share of ignored rows, a bias and class weights when asked."""
    gen = torch.Generator().manual_seed(seed)
    n_shape = tuple(n_shape) if isinstance(n_shape, tuple | list) else (n_shape,)
    x = torch.randn(*n_shape, h, generator=gen, dtype=torch.float64)
    w = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / max(h, 1) ** 0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, n_shape, generator=gen)
    if ignore_frac:
        t[torch.rand(n_shape, generator=gen) < ignore_frac] = -100
    cw = (torch.rand(v, generator=gen, dtype=torch.float64) + 0.25) if class_weight else None

    def cast(a):
        return None if a is None else a.to(dtype).to(device)

    return cast(x), cast(w), t.to(device), cast(b), cast(cw)


def reference(x, w, t, b, **options):
    """Loss (float64) and gradients of x, w, b from the logits path in float64 on the same
    (rounded) values; `upstream` (optional) is the incoming gradient."""
    upstream = options.pop("upstream", None)
    xs, ws = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bs = b.detach().double().requires_grad_() if b is not None else None
    cw = options.pop("class_weight", None)
    cw = cw.double() if cw is not None else None
    logits = F.linear(xs, ws, bs)
    flat = logits.reshape(-1, logits.shape[-1])
    if any(k not in TORCH_OPTIONS + ("reduction",) for k in options):
        out = xent_ext.cross_entropy(flat, t.reshape(-1), weight=cw, **options)
    else:
        out = F.cross_entropy(flat, t.reshape(-1), weight=cw, **options)
    loss = out[0] if isinstance(out, tuple) else out
    if loss.dim() > 0:
        loss = loss.reshape(t.shape)
    g = torch.ones_like(loss) if upstream is None else upstream.double()
    wrt = [a for a in (xs, ws, bs) if a is not None]
    grads = torch.autograd.grad(loss, wrt, g, allow_unused=True)
    return out, loss.detach(), grads


def assert_close(actual, expected, dtype, what, scale=None):
    rtol, gtol = TOL[dtype]
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        atol = rtol
    else:
        atol = gtol * max(scale, 1e-3)
        rtol = 0.0
    ok = (actual.isnan() & expected.isnan()) | ((actual - expected).abs()
                                                <= atol + rtol * expected.abs())
    if not bool(ok.all()):
        diff = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: max abs diff {diff:.3e} (atol {atol:.1e}, rtol {rtol:.1e})")


def assert_grads_close(grads, ref_grads, dtype, names=("input", "weight", "bias")):
    for g, r, name in zip(grads, ref_grads, names, strict=False):
        assert g is not None and g.dtype == dtype, name
        scale = r.abs().max().item() if r.numel() else 1.0
        assert_close(g, r, dtype, f"d {name}", scale=scale)
