"""Shared test helpers: devices, per-dtype tolerances, and the comparison against PyTorch.

The judge is F.cross_entropy computed in float64 on the same (already rounded) input values;
F.cross_entropy in the input's own dtype is the peer we must be at least as accurate as.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .skip_summary import pytest_terminal_summary  # noqa: F401  (a hook: why tests skipped)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# (loss rtol, loss atol, grad atol relative to the largest reference gradient entry).
# Half types round the result once: half an ulp of the output is the floor of the error.
TOL = {
    torch.float64: (1e-10, 1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2, 1.6e-2),
}


def cpu_isas() -> list[str]:
    """The vectorised CPU instruction sets this machine can run."""
    found = []
    for isa in ("avx512", "avx2", "base"):
        try:
            xent_ext.set_cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    xent_ext.set_cpu_isa("auto")
    return found


@pytest.fixture(params=cpu_isas())
def cpu_isa(request):
    """Runs a test once per CPU instruction set, so every path is exercised on this machine."""
    xent_ext.set_cpu_isa(request.param)
    yield request.param
    xent_ext.set_cpu_isa("auto")


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels compiled for the host against the emulation runtime (tests/emu_support)."""
    from .emu_support import build_emulation

    return build_emulation()


def random_logits(shape, dtype, device, scale=3.0, generator=None) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    return x.to(dtype).to(device)


def random_targets(n_rows_shape, n_classes, device, ignore_frac=0.0, ignore_index=-100,
                   generator=None) -> torch.Tensor:
    t = torch.randint(0, max(n_classes, 1), n_rows_shape, generator=generator)
    if ignore_frac > 0:
        mask = torch.rand(n_rows_shape, generator=generator) < ignore_frac
        t[mask] = ignore_index
    return t.to(device)


def _to64(v):
    return v.double() if torch.is_tensor(v) and v.is_floating_point() else v


def run_both(input: torch.Tensor, target: torch.Tensor, upstream: str = "ones", **kwargs):
    """Loss and input gradient from xent_ext (input dtype) and from F.cross_entropy in float64
    and in the input dtype.  upstream: 'ones' (the free backward) or 'random' (scaled)."""
    results = {}
    for name, fn, cast in (("ours", xent_ext.cross_entropy, lambda v: v),
                           ("ref64", F.cross_entropy, _to64),
                           ("torch", F.cross_entropy, lambda v: v)):
        x = cast(input.detach()).requires_grad_(True)
        t = cast(target) if target.is_floating_point() else target
        kw = {k: cast(v) for k, v in kwargs.items()}
        loss = fn(x, t, **kw)
        if upstream == "ones":
            g_out = torch.ones_like(loss)
        else:
            gen = torch.Generator().manual_seed(7)
            g_out = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5)
            g_out = g_out.to(loss.dtype).to(loss.device)
        (grad,) = torch.autograd.grad(loss, x, g_out)
        results[name] = (loss.detach(), grad)
    return results


def assert_close_to_reference(input, target, upstream="ones", **kwargs):
    r = run_both(input, target, upstream=upstream, **kwargs)
    loss, grad = r["ours"]
    ref_loss, ref_grad = r["ref64"]
    torch_loss, torch_grad = r["torch"]
    assert loss.dtype == input.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == input.dtype and grad.shape == input.shape
    rtol, atol, gtol = TOL[input.dtype]
    _assert_close(loss.double(), ref_loss, rtol, atol, "loss vs float64")
    # Relative to the largest gradient entry, floored: where every entry is ~0 (one class,
    # softmax == one-hot), the float32 rounding of the coefficients sets the error, not 0.
    gscale = max(ref_grad.abs().max().item(), 1e-3) if ref_grad.numel() else 1.0
    _assert_close(grad.double(), ref_grad, 0.0, gtol * gscale, "grad vs float64")
    # At least as accurate as PyTorch in the same dtype (with slack for rounding ties).
    if input.dtype != torch.float64 and ref_loss.numel():
        ours_err = (loss.double() - ref_loss).abs().nan_to_num(0).max().item()
        torch_err = (torch_loss.double() - ref_loss).abs().nan_to_num(0).max().item()
        scale = max(1.0, ref_loss.abs().nan_to_num(0).max().item())
        assert ours_err <= 2 * torch_err + atol * scale, (
            f"loss error {ours_err} vs torch's {torch_err}")
    return r


def _assert_close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    both_nan = actual.isnan() & expected.isnan()
    same_inf = actual.isinf() & expected.isinf() & (actual == expected)
    ok = both_nan | same_inf | ((actual - expected).abs() <= atol + rtol * expected.abs())
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        diff = (actual - expected).abs().nan_to_num(float("inf"))
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3e} "
                             f"(atol {atol:.1e}, rtol {rtol:.1e}); first bad indices {bad}")
