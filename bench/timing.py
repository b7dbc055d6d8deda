"""Timing of one cell: a warm call to size the reps, then the median of the timed reps.

CPU: time.perf_counter around each rep (the call returns when the work is done).
CUDA: a pair of CUDA events around each rep, read after one synchronize at the end, so the
host never stalls the queue between reps; the warm call is synchronized to estimate its cost.

Inputs rotate among several copies so that a small input is not timed from a warm cache: the
copies together are at least CACHE_FACTOR times the last-level cache (L2 on a GPU, the largest
CPU cache), within a share of free memory.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cases import Budget

CACHE_FACTOR = 4
MAX_COPIES = 64
MEMORY_SHARE = 0.25  # the copies may use at most this share of the free memory


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    times_ms: list[float] = field(repr=False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    sizes = [0]
    for i in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) or 32 << 20  # unknown: assume a 32 MiB last-level cache


def free_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def rotation_count(input_bytes: int, held_bytes: int, device: str) -> int:
    """How many input copies to rotate among: enough logits (input_bytes each) to cover
    CACHE_FACTOR caches, as long as the copies (held_bytes each, with the buffers that go
    with them) fit in a share of the free memory."""
    want = math.ceil(CACHE_FACTOR * cache_bytes(device) / input_bytes)
    fit = int(MEMORY_SHARE * free_bytes(device) // held_bytes)
    return max(1, min(want, fit, MAX_COPIES))


def measure(step: Callable[[int], None], n_inputs: int, device: str,
            budget: Budget) -> Timing:
    """Times step(i) over inputs i = 0, 1, ... (mod n_inputs).  The caller has already made
    the first call (compilation, lazy initialisation, the correctness check)."""
    # Python's cyclic garbage collector is off while timing, as in timeit: otherwise a
    # collection of the whole heap (torch, dynamo, inductor: millions of objects) lands in
    # whichever rep crossed the allocation threshold, at random, for every implementation.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _measure(step, n_inputs, device, budget)
    finally:
        if was_enabled:
            gc.enable()


def _measure(step: Callable[[int], None], n_inputs: int, device: str,
             budget: Budget) -> Timing:
    # Warm calls: one for a slow call, up to 0.1 s of them for short ones (allocator, caches,
    # clocks); the last one sizes the reps.
    warm_s = total_s = 0.0
    for i in range(8):
        t0 = time.perf_counter()
        step(i % n_inputs)
        sync(device)
        warm_s = time.perf_counter() - t0
        total_s += warm_s
        if warm_s > 0.05 or total_s > 0.1:
            break
    reps = min(budget.max_reps, max(budget.min_reps, math.ceil(budget.seconds / warm_s)))
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            step(r % n_inputs)
            ends[r].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            step(r % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), reps, times)
