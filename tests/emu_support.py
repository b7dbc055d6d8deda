"""The CPU emulation of the CUDA kernels (csrc/cuda/emu/) as the tests use it: its build, the
call of the emulated forward, the regimes' shapes and devices, and a comparison that also checks
NaN and infinity patterns.  The `emu` fixture (tests/conftest.py) builds it once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

RED = {"none": 0, "mean": 1, "sum": 2}
# An H100-like device by default; the tests shrink it to reach the other regimes.
H100 = {"sms": 132, "smem_optin": 227 * 1024, "smem_per_sm": 228 * 1024, "max_cluster": 16}
# An A100-like device: no thread-block clusters.
A100 = {"sms": 108, "smem_optin": 163 * 1024, "smem_per_sm": 164 * 1024, "max_cluster": 1}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def build_emulation():
    """Compiles the emulated CUDA forward for the host (ninja, incremental: build/emu)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        pytest.skip("ninja is needed to build the emulation (pip install ninja)")
    build = ROOT / "build" / "emu"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="xent_emu",
                    sources=[str(ROOT / "csrc/cuda/emu/xent_emu.cpp"),
                             str(ROOT / "csrc/xent_forward.cpp"),
                             str(ROOT / "csrc/cpu/buffer_cache.cpp")],
                    extra_cflags=["-O1", "-DXENT_CUDA_EMULATION=1"],
                    build_directory=str(build), verbose=False)
    except (OSError, RuntimeError) as e:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip(f"no C++ compiler to build the emulation: {e}")
        raise


def emu_forward(emu, x, t, weight=None, reduction="mean", ignore_index=-100, ls=0.0,
                logit_scale=1.0, softcap=0.0, z_loss=0.0, grad=True, regime="auto", dev=H100,
                inplace=False):
    """cross_entropy_fwd through the emulated CUDA path; x is (N, C, S)."""
    return emu.forward(x, t, weight, RED[reduction], ignore_index, ls, logit_scale, softcap,
                       z_loss, grad, regime, dev["sms"], dev["smem_optin"], dev["smem_per_sm"],
                       dev.get("max_cluster", 1), inplace)


def assert_close_nan(actual, expected, tol, what):
    """Same NaN positions and infinities; finite values within tol * max(1, max |expected|)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN pattern differs: ours {actual.isnan().nonzero()[:6].tolist()}, "
        f"torch {expected.isnan().nonzero()[:6].tolist()}")
    inf = ~torch.isfinite(expected) & ~expected.isnan()
    assert torch.equal(actual[inf], expected[inf]), f"{what}: infinities differ"
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: an infinity where torch is finite"
    if fin.any():
        scale = max(1.0, expected[fin].abs().max().item())
        err = (actual[fin] - expected[fin]).abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3g}"


def emu_data(n, c, s, dtype, seed, offset=0):
    """Logits (N, C, S) (offset elements into their storage), class targets, probability
    targets and class weights, all random."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(n * c * s + offset, generator=g, dtype=torch.float64) * 3).to(dtype)
    x = flat[offset:].view(n, c, s)
    t = torch.randint(0, c, (n, s), generator=g)
    q = torch.softmax(torch.randn(n, c, s, generator=g, dtype=torch.float64), 1).to(dtype)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(wdt)
    return x, t, q, w


# (name, N, C, S, regime forced, device, regimes the plan may pick (by dtype)).  A name with
# "transposed" expects the K-dim input to run as rows of a transposed copy.
SHAPES = [
    ("group8", 9, 10, 1, "group", H100, ("group",)),
    ("group32", 7, 100, 1, "group", H100, ("group",)),
    ("group-short-rows", 9, 100, 1, "auto", H100, ("group",)),
    ("group-tiny-rows", 37, 5, 1, "auto", H100, ("group",)),  # two lanes per row
    ("group32x4", 5, 480, 1, "auto", H100, ("group", "regs")),  # f32: 4 items per lane
    ("group32x4h", 5, 1000, 1, "auto", H100, ("group", "regs")),  # 16-bit: 4 items per lane
    ("regs", 5, 3001, 1, "auto", H100, ("regs",)),
    ("regs-cluster", 3, 20001, 1, "auto", H100, ("regs",)),  # few rows: many blocks per row
    ("regs-cluster-many", 40, 20001, 1, "auto", dict(H100, sms=8), ("regs",)),
    ("regs-a100", 5, 20001, 1, "auto", A100, ("regs", "block")),  # f32, f64: too long for one
    ("block", 5, 3001, 1, "block", H100, ("block",)),
    ("block-partial-cache", 3, 4099, 1, "block", dict(H100, smem_optin=6144), ("block",)),
    ("split", 3, 20001, 1, "split", dict(H100, sms=8), ("split",)),
    # One SM: a few resident blocks walk many rows each (the group regime stages the next row
    # while working on the current one; the block regime reuses its cache row after row).
    ("group8-many-rows", 300, 10, 1, "group", dict(H100, sms=1), ("group",)),
    ("group32x4-many-rows", 90, 1000, 1, "auto", dict(H100, sms=1), ("group", "regs")),
    ("regs-many-rows", 40, 3001, 1, "auto", dict(H100, sms=1), ("regs",)),
    ("block-many-rows", 40, 3001, 1, "block", dict(H100, sms=1), ("block",)),
    ("kdim-300", 2, 300, 3, "auto", H100, ("kdim",)),
    ("kdim-tiles", 3, 21, 70, "auto", H100, ("kdim",)),  # partial last tile
    ("kdim-aligned", 2, 45, 64, "auto", H100, ("kdim",)),  # 16-byte class rows: cp.async
    ("kdim-transposed", 2, 900, 3, "auto", dict(H100, smem_optin=48 * 1024), ("group", "regs")),
    ("strided-rows", 5, 37, 1, "strided", H100, ("strided",)),  # forced on contiguous rows
    ("strided", 3, 7, 5, "strided", H100, ("strided",)),
    ("kdim-small", 3, 7, 5, "auto", H100, ("kdim",)),
]
