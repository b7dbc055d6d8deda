"""Checks of the CUDA kernels that need no GPU.

1. The compiled extension (xent_ext/_C*.so), read with cuobjdump (PyPI nvidia-cuda-cuobjdump):
   - no kernel of ours uses local memory (register spills or stack) on any architecture built;
   - the vectorised row kernels for bfloat16, float16 and float32 load and store 16 bytes at a
     time (128-bit LDG / STG in the SASS) on sm_80 and sm_90.
   Skipped when the extension was built without CUDA (XENT_FORCE_CPU=1, or a CPU-only torch)
   or when the tools are missing; in CI (CI=true) these fail instead.
2. The CUDA forward (plan, launches, every kernel) compiled for the host against a CPU emulation
   of the CUDA thread model (csrc/cuda/emu/) and compared with F.cross_entropy and the CPU op:
   every regime (group, block, block with a partial shared-memory cache, scalar fallback, split,
   strided), odd sizes, all options.  This is where the kernels' index math is tested on
   machines without a GPU; tests/test_cuda.py runs the real thing on a GPU.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xent_ext

from .emu_support import (
    A100,
    DTYPES,
    H100,
    RED,
    SHAPES,
    TOL,
    emu_forward,
)
from .emu_support import assert_close_nan as _assert_close
from .emu_support import emu_data as _data

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# 1. The compiled binary.
# ---------------------------------------------------------------------------------------------

# Kernel families of csrc/cuda (mangled names contain these).
KERNEL_FAMILIES = ("group_rows_kernel", "regs_rows_kernel", "kdim_tile_kernel",
                   "block_rows_kernel", "split_stats_kernel", "split_grad_kernel",
                   "strided_kernel", "scale_grad_kernel")
# Mangled template arguments <scalar_t, VEC> of the vectorised kernels.
VEC_DTYPES = {"bfloat16": "IN3c108BFloat16ELi8E", "float16": "IN3c104HalfELi8E",
              "float32": "IfLi4E"}
# 128-bit global load / store, whatever modifiers sit between (LDG.E.128,
# LDG.E.128.CONSTANT, LDG.E.EL.128, ...).
LDG128 = re.compile(r"\bLDG(?:\.[A-Z0-9_]+)*\.128\b")
STG128 = re.compile(r"\bSTG(?:\.[A-Z0-9_]+)*\.128\b")
ARCHS = ("sm_80", "sm_90")


def _extension_path() -> Path:
    return Path(xent_ext._C.__file__)


def _find_tool(name: str) -> str | None:
    """A CUDA binary tool: $XENT_<NAME> (a path), PATH, $CUDA_HOME/bin, then the PyPI wheels
    (nvidia/*/bin, triton's bundled copy)."""
    env = os.environ.get(f"XENT_{name.upper()}")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which(name)
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(cuda_home, "bin", name)]
    for base in sys.path:
        if not os.path.isdir(base):
            continue
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "*", "bin", name)))
        candidates += [os.path.join(base, "triton", "backends", "nvidia", "bin", name)]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _unavailable(reason: str):
    """Skips the check, except in CI (CI=true), where what it needs is installed on purpose:
    there a missing toolkit or tool fails the run instead of hiding the check."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} [CI=true: the static CUDA checks must run]", pytrace=False)
    pytest.skip(reason)


def _require_cuda_build():
    if not xent_ext.has_cuda():
        _unavailable("xent_ext was built without CUDA (XENT_FORCE_CPU=1 or no CUDA toolkit): "
                     "no kernels to check")


def _cuobjdump() -> str:
    tool = _find_tool("cuobjdump")
    if tool is None:
        _unavailable("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    return tool


def _run(args: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[:2000]}")
    return proc.stdout


@functools.lru_cache(maxsize=1)
def _resource_usage() -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {mangled kernel: {REG: .., STACK: .., LOCAL: .., ...}}} of our kernels."""
    out = _run([_cuobjdump(), "--dump-resource-usage", str(_extension_path())])
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch, func = None, None
    for line in out.splitlines():
        m = re.match(r"\s*arch\s*=\s*(sm_\d+\w*)", line)
        if m:
            arch = m.group(1)
            usage.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line and arch is not None:
            if "4xent" in func:  # namespace xent: ours (not torch's or the runtime's)
                usage[arch][func] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)",
                                                                      line)}
            func = None
    return usage


def _families(names) -> set[str]:
    return {f for f in KERNEL_FAMILIES for n in names if f in n}


def test_binary_has_our_kernels():
    _require_cuda_build()
    usage = _resource_usage()
    archs = [a for a, k in usage.items() if k]
    assert archs, f"no kernel of xent_ext found in {_extension_path()} by cuobjdump"
    for arch in archs:
        missing = set(KERNEL_FAMILIES) - _families(usage[arch])
        assert not missing, f"{arch}: kernels missing from the binary: {sorted(missing)}"


def test_no_local_memory():
    """No register spills, no stack: every kernel keeps its state in registers and shared
    memory (STACK holds spills; LOCAL other local arrays)."""
    _require_cuda_build()
    usage = _resource_usage()
    assert any(usage.values()), "no kernel of xent_ext found by cuobjdump"
    bad = [f"{arch} {name}: STACK={u.get('STACK')} LOCAL={u.get('LOCAL')} REG={u.get('REG')}"
           for arch, kernels in usage.items() for name, u in kernels.items()
           if u.get("STACK", 0) != 0 or u.get("LOCAL", 0) != 0]
    assert not bad, "kernels using local memory:\n" + "\n".join(bad)


@functools.lru_cache(maxsize=4)
def _sass(arch: str) -> dict[str, str]:
    """{mangled kernel: SASS text} of our kernels for one architecture."""
    nvdisasm = _find_tool("nvdisasm")
    if nvdisasm is None:
        _unavailable("nvdisasm not found (cuobjdump needs it for --dump-sass; it ships with "
                     "the CUDA toolkit, triton and the nvidia-cuda-nvdisasm wheel)")
    env = dict(os.environ)
    env["NVDISASM_PATH"] = os.path.dirname(nvdisasm)
    env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    out = _run([_cuobjdump(), "--dump-sass", "-arch", arch, str(_extension_path())], env=env)
    funcs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            current = m.group(1) if "4xent" in m.group(1) else None
            if current:
                funcs[current] = []
            continue
        if current:
            funcs[current].append(line)
    return {k: "\n".join(v) for k, v in funcs.items()}


def _hot_kernels(sass: dict[str, str], dtype_pattern: str) -> dict[str, dict[str, str]]:
    """The vectorised row kernels of one dtype with class-index targets (template arg kProb =
    false), by family: group (largest tile), regs (every items-per-thread count, each variant),
    block (each thread count), split."""
    wanted = {
        "group_rows_kernel": re.compile(r"17group_rows_kernel" + dtype_pattern + r"Li32ELi4ELb0E"),
        "regs_rows_kernel": re.compile(r"16regs_rows_kernel" + dtype_pattern),
        "block_rows_kernel": re.compile(r"17block_rows_kernel" + dtype_pattern + r"Lb0E"),
        "split_stats_kernel": re.compile(r"18split_stats_kernel" + dtype_pattern + r"Lb0E"),
        "split_grad_kernel": re.compile(r"17split_grad_kernel" + dtype_pattern + r"Lb0E"),
    }
    found = {}
    for family, pattern in wanted.items():
        names = [n for n in sass if pattern.search(n)]
        assert names, f"no {family} for {dtype_pattern}; kernels: {sorted(sass)[:10]}..."
        found[family] = {n: sass[n] for n in names}
    return found


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", sorted(VEC_DTYPES))
def test_hot_kernels_use_128bit_loads(arch, dtype):
    _require_cuda_build()
    if arch not in _resource_usage():
        _unavailable(f"the extension was not built for {arch} (TORCH_CUDA_ARCH_LIST)")
    sass = _sass(arch)
    assert sass, f"no SASS of our kernels for {arch}"
    hot = _hot_kernels(sass, VEC_DTYPES[dtype])
    for family, kernels in hot.items():
        for name, text in kernels.items():
            assert "LDG" in text, f"{arch} {name}: no global load at all (bad parse?)"
            assert LDG128.search(text), f"{arch} {name}: no 128-bit global load"
            if family != "split_stats_kernel":
                assert STG128.search(text), f"{arch} {name}: no 128-bit gradient store"


# cp.async of 16 bytes into shared memory (LDGSTS.E.BYPASS.128, LDGSTS.E.BYPASS.LTC128B.128, ...)
LDGSTS128 = re.compile(r"\bLDGSTS(?:\.[A-Z0-9_]+)*\.128\b")


@pytest.mark.parametrize("arch", ARCHS)
def test_kdim_tiles_copy_16_bytes_at_a_time(arch):
    """The K-dim tile kernel stages 32 spatial positions of a class at once: its copies into
    shared memory are 16-byte cp.async (LDGSTS.128) along the spatial dimension, and the
    gradient goes out with 16-byte stores."""
    _require_cuda_build()
    if arch not in _resource_usage():
        _unavailable(f"the extension was not built for {arch} (TORCH_CUDA_ARCH_LIST)")
    kernels = {n: t for n, t in _sass(arch).items() if "16kdim_tile_kernel" in n}
    assert kernels, f"{arch}: no kdim_tile_kernel"
    for name, text in kernels.items():
        assert LDGSTS128.search(text), f"{arch} {name}: no 16-byte cp.async"
        assert STG128.search(text), f"{arch} {name}: no 128-bit gradient store"


def test_sass_pattern_matches_known_spellings():
    for s in ("LDG.E.128 R12, desc[UR36][R12.64] ;", "LDG.E.128.CONSTANT R4, [R2.64] ;",
              "LDG.E.EL.128 R8, [R2.64] ;", "@P0 LDG.E.LTC128B.128 R4, desc[UR4][R2.64] ;"):
        assert LDG128.search(s), s
    for s in ("LDG.E.64 R4, [R2.64] ;", "LDG.E R4, [R2.64] ;", "LDG.E.U16 R4, [R2.64] ;",
              "LDG.E.LTC128B R4, [R2.64] ;"):
        assert not LDG128.search(s), s


# ---------------------------------------------------------------------------------------------
# 2. The kernels run on the CPU emulation.
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_emulated_regimes_match_torch(emu, shape, dtype):
    name, n, c, s, regime, dev, expect = shape
    x, t, q, w = _data(n, c, s, dtype, seed=c)
    t[0, 0] = -100  # one ignored row
    wd = w.to(torch.float64)
    cases = [
        dict(target=t, kw=dict(reduction="mean")),
        dict(target=t, kw=dict(reduction="none", weight=w, ls=0.25)),
        dict(target=t, kw=dict(reduction="sum", ls=0.5)),
        dict(target=q, kw=dict(reduction="mean", weight=w, ls=0.25)),
        dict(target=q, kw=dict(reduction="none")),
    ]
    tol = TOL[dtype]
    for case in cases:
        target, kw = case["target"], case["kw"]
        loss, lse, grad, plan = emu_forward(emu, x, target, regime=regime, dev=dev, **kw)
        # The regs regime takes class-index targets only: probability targets, the block one.
        prob_alt = ("block",) if target.is_floating_point() and "regs" in expect else ()
        assert plan.startswith(expect + prob_alt), (plan, expect)
        assert ("transposed" in plan) == ("transposed" in name), plan
        # Reference: F.cross_entropy in float64 on the same values, in the caller's layout.
        x64 = x.double().requires_grad_()
        xr = x64 if s > 1 else x64[:, :, 0]
        if target.is_floating_point():
            tr = target.double() if s > 1 else target.double()[:, :, 0]
        else:
            tr = target if s > 1 else target[:, 0]
        ref = F.cross_entropy(xr, tr, weight=wd if "weight" in kw else None,
                              reduction=kw["reduction"], label_smoothing=kw.get("ls", 0.0))
        (ref_grad,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
        what = f"{name} {kw} prob={target.is_floating_point()} [{plan}]"
        _assert_close(loss.view(-1), ref.detach().view(-1), tol, "loss " + what)
        gscale = max(ref_grad.abs().max().item(), 1e-30)
        _assert_close(grad / gscale, ref_grad / gscale, tol, "grad " + what)
        ref_lse = torch.logsumexp(x.double(), dim=1)
        _assert_close(lse, ref_lse, tol, "lse " + what)


@pytest.mark.parametrize("offset", [1, 3], ids=["off1", "off3"])
def test_emulated_misaligned_input_takes_scalar_path(emu, offset):
    """x starting off a 16-byte boundary while the gradient is aligned: VEC = 1."""
    x, t, _, _ = _data(4, 130, 1, torch.float32, seed=5, offset=offset)
    loss, _, grad, plan = emu_forward(emu, x, t)
    assert plan.startswith("block_scalar"), plan
    x64 = x.double()[:, :, 0].requires_grad_()
    ref = F.cross_entropy(x64, t[:, 0])
    (ref_grad,) = torch.autograd.grad(ref, x64)
    _assert_close(loss, ref.detach(), 2e-5, "loss")
    _assert_close(grad[:, :, 0], ref_grad, 2e-5, "grad")


@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: s[0])
def test_emulated_inplace_gradient_matches(emu, shape):
    """The gradient written over the logits (inplace_backward): every regime must read what it
    needs of a row (x[0], x[t]) before any block or thread overwrites it."""
    name, n, c, s, regime, dev, expect = shape
    x, t, q, w = _data(n, c, s, torch.float32, seed=c + 3)
    t[0, 0] = -100
    for target, kw in ((t, dict(reduction="mean", weight=w, ls=0.1)), (t, dict(z_loss=1e-3)),
                       (q, dict(reduction="sum"))):
        loss, lse, grad, plan = emu_forward(emu, x, target, regime=regime, dev=dev, **kw)
        xi = x.clone()
        loss_i, lse_i, grad_i, plan_i = emu_forward(emu, xi, target, regime=regime, dev=dev,
                                                    inplace=True, **kw)
        assert plan_i == plan, (plan_i, plan)
        torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
        torch.testing.assert_close(lse_i, lse, rtol=0, atol=0)
        torch.testing.assert_close(xi, grad, rtol=0, atol=0)  # the logits now hold the gradient


EXT_OPTIONS = [
    dict(softcap=5.0, logit_scale=0.7, z_loss=1e-3),
    dict(softcap=3.0, ls=0.25, reduction="none", z_loss=1e-2),
    dict(logit_scale=-1.5, reduction="sum"),
    dict(grad=False),
]


@pytest.mark.parametrize("opts", EXT_OPTIONS, ids=lambda o: "-".join(sorted(o)))
@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: s[0])
def test_emulated_extensions_match_cpu_float64(emu, shape, opts):
    """softcap, logit_scale, z_loss: the CPU op in float64 (the scalar path, xent_row.h) is the
    reference."""
    name, n, c, s, regime, dev, expect = shape
    x, t, q, _ = _data(n, c, s, torch.float32, seed=c + 1)
    opts = dict(opts)
    red, grad = opts.pop("reduction", "mean"), opts.pop("grad", True)
    for target in (t, q):
        loss, lse, g, plan = emu_forward(emu, x, target, regime=regime, dev=dev, reduction=red,
                                         grad=grad, **opts)
        prob_alt = ("block",) if target.is_floating_point() and "regs" in expect else ()
        assert plan.startswith(expect + prob_alt), (plan, expect)
        ref = torch.ops.xent_ext.cross_entropy_fwd(
            x.double(), target.double() if target.is_floating_point() else target, None,
            RED[red], -100, opts.get("ls", 0.0), opts.get("logit_scale", 1.0),
            opts.get("softcap", 0.0), opts.get("z_loss", 0.0), grad)
        _assert_close(loss, ref[0], 2e-5, f"loss {name} {plan}")
        _assert_close(lse, ref[1], 2e-5, f"lse {name} {plan}")
        if grad:
            _assert_close(g, ref[2], 2e-5, f"grad {name} {plan}")
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: s[0])
def test_emulated_special_values_like_torch(emu, shape):
    name, n, c, s, regime, dev, expect = shape
    x, t, _, _ = _data(max(n, 5), c, s, torch.float32, seed=3)
    x[0, 3] = float("nan")
    x[1, 0] = float("nan")  # NaN before any finite value of the row
    x[2, :] = float("-inf")
    x[3, c // 2] = float("inf")
    x[4, ::3] = float("-inf")
    t[4, :] = 1 if c > 1 else 0
    loss, lse, grad, plan = emu_forward(emu, x, t, reduction="none", regime=regime, dev=dev)
    ref = F.cross_entropy(x.double()[:, :, 0], t[:, 0], reduction="none")
    assert torch.equal(loss[:, 0].isnan(), ref.isnan()), (loss, ref, plan)
    fin = ~ref.isnan()
    _assert_close(loss[:, 0][fin], ref[fin], 2e-5, f"loss {plan}")
    if c > 1:  # the row with masked (-inf) entries: zero gradient there
        assert bool((grad[4, ::3] == 0).all())


def test_emulated_large_logits_and_all_ignored(emu):
    x, t, _, _ = _data(6, 3001, 1, torch.float32, seed=11)
    xb = x * 1000 + 1e4
    loss, _, grad, _ = emu_forward(emu, xb, t, ls=0.25)
    x64 = xb.double()[:, :, 0].requires_grad_()
    ref = F.cross_entropy(x64, t[:, 0], label_smoothing=0.25)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    _assert_close(loss, ref.detach(), 2e-5, "loss")
    _assert_close(grad[:, :, 0], ref_grad, 2e-5, "grad")
    loss, _, grad, _ = emu_forward(emu, x, torch.full((6, 1), -100))
    assert loss.isnan() and bool((grad == 0).all())  # 0 / 0, as torch


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_emulated_out_of_range_target_asserts(emu, shape):
    name, n, c, s, regime, dev, expect = shape
    x, t, _, _ = _data(n, c, s, torch.float32, seed=2)
    t[-1, -1] = c
    with pytest.raises(RuntimeError, match="device-side assert"):
        emu_forward(emu, x, t, regime=regime, dev=dev)
    t[-1, -1] = -7
    with pytest.raises(RuntimeError, match="device-side assert"):
        emu_forward(emu, x, t, regime=regime, dev=dev)


@pytest.mark.parametrize("dtype, n, c, dev, plan_prefix", [
    (torch.bfloat16, 4, 10, H100, "group vec=8 group=4 nv=1"),  # a warp or less per row
    (torch.bfloat16, 4, 128, H100, "group vec=8 group=16 nv=1"),  # aligned: 16 items
    (torch.bfloat16, 4, 129, H100, "group vec=8 group=32 nv=1"),
    (torch.float32, 4, 129, H100, "group vec=4 group=32 nv=2"),
    (torch.float32, 4, 480, H100, "group vec=4 group=32 nv=4"),
    (torch.bfloat16, 4, 1000, H100, "group vec=8 group=32 nv=4"),
    (torch.bfloat16, 4, 1100, H100, "group vec=8 group=32 nv=8"),
    (torch.float64, 4, 300, H100, "group vec=2 group=32 nv=8"),
    (torch.bfloat16, 4, 2100, H100, "regs vec=8"),
    (torch.float64, 4, 600, H100, "regs vec=2"),
    (torch.bfloat16, 3, 65536, H100, "regs vec=8"),  # few rows: a cluster of 16 per row
    (torch.bfloat16, 200, 65536, H100, "regs vec=8"),
    (torch.bfloat16, 200, 16384, H100, "regs vec=8"),
    (torch.float32, 2, 40000, dict(H100, sms=108), "regs vec=4"),
    (torch.bfloat16, 3, 65536, A100, "split vec=8"),  # no clusters: too long for one block
    (torch.bfloat16, 200, 65536, A100, "block vec=8"),
    (torch.bfloat16, 200, 16384, A100, "regs vec=8"),  # fits one block's registers
], ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else None)
def test_emulated_plan_choices(emu, dtype, n, c, dev, plan_prefix):
    x, t, _, _ = _data(n, c, 1, dtype, seed=1)
    loss, _, _, plan = emu_forward(emu, x, t, dev=dev)
    assert plan.startswith(plan_prefix), plan
    assert torch.isfinite(loss)
    if plan.startswith("block"):
        big = c * x.element_size() > (dev["smem_per_sm"] - 2 * 2048) // 2
        assert ("x512+" in plan) == big, plan


def test_emulated_loss_only_streams_the_row(emu):
    """Without a gradient the regs regime is a pure streaming reduction: no shared memory, and
    rows longer than a block's registers are taken R items per thread at a time."""
    for n, c, dev in ((6, 5000, H100), (2, 70001, A100)):
        x, t, _, _ = _data(n, c, 1, torch.bfloat16, seed=4)
        loss, lse, grad, plan = emu_forward(emu, x, t, grad=False, dev=dev, regime="regs")
        assert plan.startswith("regs") and plan.endswith("+0]"), plan
        assert grad.numel() == 0
        ref = F.cross_entropy(x.double()[:, :, 0], t[:, 0])
        _assert_close(loss, ref, 1.6e-2, "loss")
        _assert_close(lse, torch.logsumexp(x.double(), 1), 1e-5, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(5, 3, 1), (7, 1000, 1), (3, 37, 1), (4, 5, 6), (2, 9, 3)],
                         ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_emulated_scale_grad(emu, dtype, shape, offset):
    """The backward's in-place scaling: one factor, or one per loss row; bit-identical to the
    CPU op (factor in the accumulation type, one rounding)."""
    n, c, s = shape
    g = torch.Generator().manual_seed(n * c * s)
    flat = (torch.randn(n * c * s + offset, generator=g, dtype=torch.float64)).to(dtype)
    grad = flat[offset:].view(n, c, s)  # offset 1: not 16-byte aligned
    for scale in (torch.tensor(2.5, dtype=torch.float64),
                  torch.tensor(1.0, dtype=torch.float64),
                  torch.rand(n, s, generator=g, dtype=torch.float64).to(dtype),
                  torch.tensor([1.0, -3.0] * (n * s // 2) + [1.0] * (n * s % 2)).view(n, s)):
        ours, ref = flat.clone()[offset:].view(n, c, s), grad.clone()
        emu.scale_grad(ours, scale, 4)
        torch.ops.xent_ext.scale_grad_(ref, scale)
        assert torch.equal(ours, ref), (scale, (ours - ref).abs().max())
