"""A static performance model of the CUDA kernels, checked in every CI run (no GPU needed).

For each shape and dtype of the GPU bench it takes the plan the CUDA backend makes (through
the emulation module, which compiles the very plan_forward) on an H100 / H200-like device and
on an A100-like one, and the compiled kernels' resources (registers and static shared memory,
read with cuobjdump from the built extension), and computes per SM: resident blocks, rows (or
row slices) in flight, bytes of loads in flight, whether any logit is read from memory twice
when a gradient is written, and the SASS instructions per element of the kernel.  It prints
the table with the model's predicted fraction of the copy bandwidth and asserts the design
rules of the CUDA path on the language-model shapes (sm_90):

- at least two rows or row slices in flight per SM (one block's loads overlap another's
  arithmetic and stores);
- no logit read twice from memory when a gradient is written (the row stays on chip);
- enough bytes in flight per SM to cover the memory latency at the copy's bandwidth;
- an instruction budget per element that a kernel at copy speed can afford.

The budget, derived from the issue rate of an H200 (H100: the same SM count and clock, less
bandwidth, so more slack).  132 SMs x 4 schedulers x 1 warp instruction per clock x 1.98 GHz
= 1.05e12 warp instructions/s = 3.3e13 thread instructions/s.  A device copy moves about
4.3e12 B/s (read + write); a bfloat16 forward+backward moves 4 bytes per element (one read,
one write), 1.07e12 elements/s at copy speed, so at 90% of it 3.3e13 / (0.9 * 1.07e12) = 35
thread instructions per element fill every issue slot.  Kernels never issue every cycle
(memory instructions, dependent chains); 70% of that, 24 instructions per element, is the
budget for 16-bit types, 48 for float32 (8 bytes per element), 96 for float64.  The count is
static.  For the regs kernels, whose sweeps are fully unrolled over R items per thread, it is
the marginal cost of an element: (instructions at R = 16 - instructions at R = 8) / (8 VEC),
the two instantiations of one variant differing only by the eight extra items' loads, sweeps
and stores; the per-row part (set-up, reductions, loss, the paths a row may not take) is
printed apart, as instructions per element at the plan's R.  For the other kernels, whose
sweeps are loops, every instruction of the kernel once divided by the elements a thread
handles per row (an upper bound on the loop bodies' share).  Both are upper bounds where they
over-count: the regs kernels' marginal count includes the gradient's instructions, which the
forward alone does not run, and a loop kernel's static count includes every path it may take;
so the predicted fraction is a floor for the forward alone and for the group, block and split
kernels (whose short-row figures say little).  The assertions hold the language-model shapes
to the budget, whose bound is then the stricter.

Latency: at 4.3e12 B/s over 132 SMs each SM moves 33 GB/s; with about 0.8 us of memory
latency it needs 26 KB of loads in flight (Little's law), the figure the model asserts.
"""

from __future__ import annotations

import functools
import math
import re

import pytest

from .emu_support import A100, H100
from .test_cuda_static import _require_cuda_build, _resource_usage, _sass

H200_COPY_BW = 4.3e12  # B/s, read + write, measured (FIELD_NOTES.md)
A100_COPY_BW = 1.7e12
ISSUE_PER_S = {"sm_90": 132 * 4 * 1.98e9 * 32, "sm_80": 108 * 4 * 1.41e9 * 32}
LATENCY_S = 0.8e-6
BUDGET = {2: 24, 4: 48, 8: 96}  # SASS instructions per element, by element size
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32

# The GPU bench's shapes (bench/cases.py), (N, C) contiguous or (N, C, S) K-dim.
LM_SHAPES = [(8192, 128256), (16384, 32000), (4096, 262144)]
OTHER_SHAPES = [(8, 262144), (65536, 1000), (1048576, 10), (64, 1000, 1024)]
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
MANGLED = {"bfloat16": "N3c108BFloat16E", "float16": "N3c104HalfE", "float32": "f",
           "float64": "d"}
DEVICES = {"sm_90": dict(H100), "sm_80": dict(A100)}


@functools.cache
def _usage():
    return _resource_usage()


def _kernel_pattern(plan: dict, dtype: str) -> re.Pattern:
    t = MANGLED[dtype]
    regime = plan["regime_name"]
    if regime == "regs":
        return re.compile(rf"16regs_rows_kernelI{t}Li{plan['vec']}ELi{plan['items_per_thread']}E"
                          rf"Lb{plan['aligned']}ELb{plan['plain']}E")
    if regime == "group":
        return re.compile(rf"17group_rows_kernelI{t}Li{plan['vec']}ELi{plan['group']}E"
                          rf"Li{plan['nv']}ELb0E")
    if regime == "kdim":
        return re.compile(rf"16kdim_tile_kernelI{t}Lb0E")
    if regime == "block":
        return re.compile(rf"17block_rows_kernelI{t}Li{plan['vec']}ELb0ELi{plan['threads']}E")
    if regime == "split":
        return re.compile(rf"18split_stats_kernelI{t}Li{plan['vec']}ELb0E")
    return re.compile(rf"14strided_kernelI{t}Lb0E")


def _plan(emu, shape, elem, grad, arch):
    n, c = shape[0], shape[1]
    s = shape[2] if len(shape) > 2 else 1
    dev = DEVICES[arch]
    aligned = (c * elem) % 16 == 0
    p = dict(emu.plan(n * s, c, s, elem, True, aligned, False, grad, True, dev["sms"],
                      dev["smem_optin"], dev["smem_per_sm"], dev["max_cluster"], "auto"))
    p["regime_name"] = emu.regime_name(p["regime"])
    if p["transposed"]:  # run as contiguous rows of a transposed copy
        p2 = dict(emu.plan(n * s, c, 1, elem, True, aligned, False, grad, True, dev["sms"],
                           dev["smem_optin"], dev["smem_per_sm"], dev["max_cluster"], "auto"))
        p2["regime_name"] = emu.regime_name(p2["regime"])
        p2["transposed"] = 1
        return p2
    return p


def _resident(plan, regs, static_smem, arch):
    """Blocks per SM: limited by registers (allocated per warp in units of 256), threads and
    shared memory (1 KB reserved per block)."""
    dev = DEVICES[arch]
    threads = plan["threads"]
    warp_regs = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (warp_regs * math.ceil(threads / 32))
    by_threads = THREADS_PER_SM // threads
    by_smem = dev["smem_per_sm"] // (plan["smem"] + static_smem + 1024)
    return max(0, min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM))


def _row_model(plan, shape, elem, grad, resident):
    """(rows or slices in flight per SM, bytes of loads in flight per SM, logits read twice,
    elements a thread handles per row)."""
    c = shape[1]
    vec = 16 // elem
    regime = plan["regime_name"]
    items = math.ceil((c + vec - 1) / vec)
    if regime == "regs":
        r = plan["items_per_thread"]
        return resident, resident * plan["threads"] * r * 16, False, r * vec
    if regime == "group":
        groups = plan["threads"] // plan["group"]
        # Each group has its next row's copies in flight while it works on the current one.
        per_group = min(items, plan["group"] * plan["nv"]) * 16
        return resident * groups * 2, resident * groups * per_group, False, plan["nv"] * vec
    if regime == "kdim":
        slab = plan["smem"]
        return resident * 32, resident * slab, False, math.ceil(c / 8)
    if regime == "block":
        reread = grad and plan["cache_items"] < items
        return resident, resident * plan["cache_items"] * 16, reread, \
            math.ceil(items / plan["threads"]) * vec
    if regime == "split":
        return resident, resident * plan["threads"] * 4 * 16, grad, \
            math.ceil(plan["slice_items"] / plan["threads"]) * vec
    return resident * plan["threads"], resident * plan["threads"] * elem, grad, c


def _instructions(arch, name):
    text = _sass(arch)[name]
    return sum(1 for line in text.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+\S", line))


def _regs_marginal(arch, usage, plan, dtype):
    """SASS instructions per element of the regs kernel's unrolled sweeps (see the module
    docstring): the difference between its R = 16 and R = 8 instantiations."""
    counts = {}
    for r in (8, 16):
        pattern = _kernel_pattern(dict(plan, items_per_thread=r), dtype)
        names = [n for n in usage if pattern.search(n)]
        assert names, f"{arch}: no kernel matches {pattern.pattern}"
        counts[r] = _instructions(arch, names[0])
    return (counts[16] - counts[8]) / (8 * plan["vec"])


def _table(emu):
    rows = []
    for arch in DEVICES:
        usage = _usage().get(arch)
        if not usage:
            continue
        for shape in LM_SHAPES + OTHER_SHAPES:
            for dtype, elem in DTYPES.items():
                for grad in (True, False):
                    plan = _plan(emu, shape, elem, grad, arch)
                    pattern = _kernel_pattern(plan, dtype)
                    names = [n for n in usage if pattern.search(n)]
                    assert names, f"{arch} {dtype} {shape}: no kernel matches {pattern.pattern}"
                    name = names[0]
                    u = usage[name]
                    resident = _resident(plan, u.get("REG", 0), u.get("SHARED", 0), arch)
                    inflight, bytes_inflight, reread, per_thread = _row_model(
                        plan, shape, elem, grad, resident)
                    instr = _instructions(arch, name)
                    per_elem = instr / max(per_thread, 1)
                    if plan["regime_name"] == "regs":
                        per_elem = _regs_marginal(arch, usage, plan, dtype)
                    rows.append(dict(arch=arch, shape=shape, dtype=dtype, elem=elem, grad=grad,
                                     plan=plan, kernel=name, regs=u.get("REG", 0),
                                     resident=resident, inflight=inflight,
                                     bytes_inflight=bytes_inflight,
                                     reread=reread or bool(plan["transposed"]),
                                     instr=instr, per_elem=per_elem,
                                     static_per_elem=instr / max(per_thread, 1),
                                     predicted=_predicted(arch, elem, grad, bytes_inflight,
                                                          per_elem, reread, plan)))
    return rows


def _predicted(arch, elem, grad, bytes_inflight, per_elem, reread, plan):
    """The model's fraction of the copy bandwidth: limited by loads in flight (Little's law), by
    the issue rate, and by the extra traffic of a re-read or a transposed copy."""
    bw = H200_COPY_BW if arch == "sm_90" else A100_COPY_BW
    sms = DEVICES[arch]["sms"]
    need = bw / sms * LATENCY_S / (2 if grad else 1)  # loads are half the traffic with a gradient
    latency = min(1.0, bytes_inflight / need)
    elems_per_s = bw / ((2 if grad else 1) * elem)
    issue = min(1.0, 0.7 * ISSUE_PER_S[arch] / (per_elem * elems_per_s))
    traffic = 1.0
    if reread:
        traffic = 2 / 3 if grad else 1.0
    if plan["transposed"]:
        traffic = 0.5
    return latency * issue * traffic


@pytest.fixture(scope="module")
def table(emu):
    _require_cuda_build()
    rows = _table(emu)
    if not rows:
        pytest.skip("the extension holds no sm_80 / sm_90 kernels")
    print("\narch  dtype     shape                grad regime          regs blk/SM rows/SM "
          "KB-in-flight reread instr/elem static/elem predicted")
    for r in rows:
        p = r["plan"]
        regime = p["regime_name"] + (f" R{p['items_per_thread']} K{p['cluster']}"
                                     if p["regime_name"] == "regs" else "")
        if p["transposed"]:
            regime += " (T)"
        print(f"{r['arch']} {r['dtype']:9} {str(r['shape']):20} {str(r['grad']):5} "
              f"{regime:15} {r['regs']:4} {r['resident']:6} {r['inflight']:7} "
              f"{r['bytes_inflight'] / 1024:12.1f} {str(r['reread']):6} {r['per_elem']:10.1f} "
              f"{r['static_per_elem']:11.1f} "
              f"{100 * r['predicted']:8.0f}%")
    return rows


def _lm_rows(table, arch="sm_90"):
    return [r for r in table if r["arch"] == arch and r["shape"] in LM_SHAPES]


def test_two_rows_in_flight_per_sm_on_language_model_shapes(table):
    for r in _lm_rows(table):
        assert r["inflight"] >= 2, (r["dtype"], r["shape"], r["grad"], r["plan"], r["resident"])


def test_no_logit_read_twice_with_a_gradient(table):
    for r in _lm_rows(table):
        if r["grad"]:
            assert not r["reread"], (r["dtype"], r["shape"], r["plan"])


def test_enough_bytes_in_flight(table):
    for r in _lm_rows(table):
        need = H200_COPY_BW / DEVICES["sm_90"]["sms"] * LATENCY_S / (2 if r["grad"] else 1)
        assert r["bytes_inflight"] >= need, (r["dtype"], r["shape"], r["bytes_inflight"], need)


def test_instruction_budget(table):
    for r in _lm_rows(table):
        assert r["per_elem"] <= BUDGET[r["elem"]], (
            f"{r['dtype']} {r['shape']} grad={r['grad']}: {r['per_elem']:.1f} SASS instructions "
            f"per element > budget {BUDGET[r['elem']]} ({r['kernel']})")


def test_the_forward_alone_stages_nothing_in_shared_memory(table):
    for r in _lm_rows(table):
        if not r["grad"]:
            assert r["plan"]["regime_name"] == "regs" and r["plan"]["smem"] == 0, r["plan"]


def test_short_rows_take_a_warp_or_less_per_row(table):
    for r in table:
        if r["shape"][1] <= 1024 and len(r["shape"]) == 2:
            assert r["plan"]["regime_name"] == "group" and r["plan"]["group"] <= 32, r["plan"]


def test_kdim_inputs_are_read_along_the_spatial_dimension(table):
    for r in table:
        if len(r["shape"]) == 3:
            assert r["plan"]["regime_name"] == "kdim" and not r["plan"]["transposed"], r["plan"]
