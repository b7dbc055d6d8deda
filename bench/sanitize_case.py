"""Runs every CUDA kernel regime of xent_ext once on small inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python bench/sanitize_case.py
    compute-sanitizer --tool racecheck python bench/sanitize_case.py

Each case is forward + backward, checked against F.cross_entropy (float64) so a wrong result
fails too; the exit status is non-zero on any mismatch.

    python bench/sanitize_case.py --profile

runs larger shapes instead, one regime each, and prints the time and the achieved bandwidth of
forward+backward (one read of the logits, one write of the gradient) next to a device-to-device
copy of the same bytes (the HBM floor); run it under ncu to see the kernels' own counters.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import xent_ext

DEV = "cuda"


def _check(name, x, t, **kw):
    xo = x.detach().clone().requires_grad_(True)
    loss = xent_ext.cross_entropy(xo, t, **kw)
    loss.backward(torch.ones_like(loss))
    x64 = x.detach().double().requires_grad_(True)
    t64 = t.double() if t.is_floating_point() else t
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in kw.items()}
    ref = F.cross_entropy(x64, t64, **kw64)
    ref.backward(torch.ones_like(ref))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(x.dtype, 3e-2)
    lerr = (loss.double() - ref.detach()).abs().max().item() if ref.numel() else 0.0
    gerr = (xo.grad.double() - x64.grad).abs().max().item() if x.numel() else 0.0
    gscale = max(x64.grad.abs().max().item(), 1e-30) if x.numel() else 1.0
    lscale = max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0
    ok = lerr <= tol * lscale and gerr <= tol * gscale
    print(f"{'ok  ' if ok else 'FAIL'} {name:<28} {str(x.dtype)[6:]:<9} {tuple(x.shape)} "
          f"loss err {lerr:.2e} grad err {gerr / gscale:.2e}", flush=True)
    return ok


def _loss_only(name, x, t):
    """compute_grad=False: the split regime then combines without a gradient pass."""
    with torch.no_grad():
        loss = xent_ext.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x.double(), t, reduction="none")
    err = (loss.double() - ref).abs().max().item()
    ok = err <= 3e-2 * max(1.0, ref.abs().max().item())
    print(f"{'ok  ' if ok else 'FAIL'} {name:<28} loss only err {err:.2e}", flush=True)
    return ok


class _regime:
    """XENT_CUDA_REGIME for the duration of a with block (read at every call)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        os.environ["XENT_CUDA_REGIME"] = self.name

    def __exit__(self, *exc):
        os.environ.pop("XENT_CUDA_REGIME", None)


def sanitize_cases() -> bool:
    g = torch.Generator(device=DEV).manual_seed(0)

    def x_(n, c, dtype=torch.bfloat16, *rest):
        return torch.randn((n, c) + rest, device=DEV, generator=g).mul_(3).to(dtype)

    def t_(n, c, *rest):
        t = torch.randint(0, c, (n,) + rest, device=DEV, generator=g)
        t.view(-1)[::5] = -100
        return t

    def q_(n, c, dtype=torch.bfloat16):
        return torch.softmax(torch.randn((n, c), device=DEV, generator=g), 1).to(dtype)

    ok = True
    # group regime: 8 lanes per row (tiny C) and 32 lanes with 1, 2, 4 items per lane
    for c, dtype in ((10, torch.bfloat16), (100, torch.float32), (257, torch.float16),
                     (1000, torch.bfloat16), (200, torch.float64)):
        ok &= _check(f"group C={c}", x_(33, c, dtype), t_(33, c))
    ok &= _check("group prob+weight+ls", x_(17, 300), q_(17, 300),
                 weight=torch.rand(300, device=DEV, generator=g).to(torch.bfloat16) + 0.5,
                 label_smoothing=0.1)
    # block regime: odd C (partial first/last items), > 48 KiB of shared memory, prob targets
    ok &= _check("block C=32001", x_(40, 32001), t_(40, 32001), label_smoothing=0.1)
    ok &= _check("block prob f32", x_(6, 5000, torch.float32), q_(6, 5000, torch.float32))
    with _regime("block"):  # few rows would otherwise take the split regime
        ok &= _check("block C=32768 (64KiB smem)", x_(8, 32768), t_(8, 32768))
        # rows larger than shared memory: cached in part, 512 threads (f32, 512 KiB rows)
        ok &= _check("block partial cache", x_(8, 131072, torch.float32), t_(8, 131072),
                     reduction="sum")
    # regs regime: the row in registers, one block (aligned and plain variants, odd C) and a
    # thread-block cluster per row on sm_90 (distributed shared memory: racecheck's case)
    ok &= _check("regs C=4096 plain", x_(24, 4096), t_(24, 4096))
    ok &= _check("regs C=4099 smoothing", x_(24, 4099), t_(24, 4099), label_smoothing=0.1)
    ok &= _check("regs cluster C=131072", x_(6, 131072), t_(6, 131072))
    ok &= _check("regs cluster f32 odd", x_(3, 100003, torch.float32), t_(3, 100003),
                 label_smoothing=0.1)
    ok &= _loss_only("regs streaming", x_(4, 200000), t_(4, 200000))
    # kdim regime: 32-position tiles, aligned and not, a partial last tile
    ok &= _check("kdim tiles", x_(3, 300, torch.bfloat16, 64), t_(3, 300, 64))
    ok &= _check("kdim partial tile", x_(2, 37, torch.float32, 45), t_(2, 37, 45))
    # scalar fallback: rows off a 16-byte boundary
    flat = x_(1, 12 * 3000 + 1).view(-1)
    ok &= _check("block_scalar misaligned", flat[1:].view(12, 3000), t_(12, 3000))
    # split regime: few rows, huge C
    ok &= _check("split C=262147", x_(3, 262147), t_(3, 262147), label_smoothing=0.1)
    ok &= _check("split prob f32", x_(2, 70001, torch.float32), q_(2, 70001, torch.float32))
    ok &= _loss_only("split", x_(2, 70001), t_(2, 70001))
    # K-dim input forced onto one thread per row
    with _regime("strided"):
        ok &= _check("strided K-dim", x_(4, 21, torch.bfloat16, 9, 7), t_(4, 21, 9, 7))
    # K-dim rows whose tile does not fit shared memory: a transposed copy
    ok &= _check("K-dim transposed", x_(2, 5000, torch.float16, 5), t_(2, 5000, 5))
    # backward with an upstream gradient other than 1 (scale_grad_)
    x = x_(6, 1000).requires_grad_()
    xent_ext.cross_entropy(x, t_(6, 1000), reduction="none").sum().mul(3.0).backward()
    x.grad = None
    loss = xent_ext.cross_entropy(x, t_(6, 1000), reduction="none")
    loss.backward(torch.arange(6, device=DEV, dtype=loss.dtype))
    # forced regimes on one shape
    x, t = x_(8, 20000), t_(8, 20000)
    for regime in ("group", "regs", "block", "block_scalar", "split", "strided"):
        with _regime(regime):
            ok &= _check(f"forced {regime}", x, t)
    torch.cuda.synchronize()
    return ok


def _fwd_bwd(x, t):
    x.grad = None
    xent_ext.cross_entropy(x, t).backward()


def _time(fn, reps=10):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def profile_cases() -> bool:
    """Loss alone and loss + gradient per regime (forced where it is not the automatic pick,
    to compare candidates on one shape), against a copy of the same bytes."""
    g = torch.Generator(device=DEV).manual_seed(0)
    bf16, f32 = torch.bfloat16, torch.float32
    shapes = [("auto", 1048576, 10, bf16), ("strided", 1048576, 10, bf16),
              ("auto", 262144, 100, bf16), ("strided", 262144, 100, bf16),
              ("auto", 65536, 1000, bf16), ("block", 65536, 1000, bf16),
              ("auto", 8192, 32000, bf16), ("auto", 8192, 32000, f32),
              ("auto", 4096, 128256, bf16), ("auto", 512, 262144, bf16),
              ("auto", 4, 1 << 20, bf16), ("block", 4, 1 << 20, bf16)]
    print(f"{'regime':<8}{'dtype':<10}{'shape':>14}{'fwd ms':>9}{'GB/s':>7}{'fwd+bwd ms':>12}"
          f"{'GB/s':>7}{'copy GB/s':>11}{'fwd+bwd/copy':>14}", flush=True)
    for regime, n, c, dtype in shapes:
        x = torch.randn((n, c), device=DEV, generator=g).to(dtype).requires_grad_(True)
        t = torch.randint(0, c, (n,), device=DEV, generator=g)
        nbytes = x.numel() * x.element_size()
        y = torch.empty_like(x)
        with _regime(regime):
            with torch.no_grad():
                t_fwd = _time(lambda x=x, t=t: xent_ext.cross_entropy(x, t))
            t_both = _time(lambda x=x, t=t: _fwd_bwd(x, t))
        t_copy = _time(lambda x=x, y=y: y.copy_(x.detach()))
        print(f"{regime:<8}{str(dtype)[6:]:<10}{f'{n}x{c}':>14}{t_fwd * 1e3:>9.3f}"
              f"{nbytes / t_fwd / 1e9:>7.0f}{t_both * 1e3:>12.3f}{2 * nbytes / t_both / 1e9:>7.0f}"
              f"{2 * nbytes / t_copy / 1e9:>11.0f}{t_both / t_copy:>13.2f}x", flush=True)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="larger shapes, timings")
    args = p.parse_args()
    if not torch.cuda.is_available() or not xent_ext.has_cuda():
        print("needs a CUDA device and a CUDA build of xent_ext")
        return 2
    ok = profile_cases() if args.profile else sanitize_cases()
    print("all cases ok" if ok else "SOME CASES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
