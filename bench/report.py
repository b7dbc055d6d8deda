"""Derived numbers (bandwidth, share of copy bandwidth, speedups), the printed table, the JSON.

Bytes per call count the logits only, the traffic a single fused pass cannot avoid:
  fwd      N*V*itemsize      (one read of the logits)
  fwdbwd   2*N*V*itemsize    (one read of the logits, one write of the gradient)
  copy     2*N*V*itemsize    (out.copy_(x): one read, one write)
Anything an implementation moves beyond that (intermediates, second passes) shows up as a
lower GB/s, which is the point of reporting it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from .cases import DTYPES, shape_label
from .impls import COMPILE, EAGER
from .runner import Cell, RunResult

LEGEND = """\
median ms   median of the timed reps after warm-up (CPU: perf_counter; CUDA: CUDA events);
            min ms: the fastest rep (a large gap to the median means a noisy machine)
vs eager    eager median / this median (>1: faster than F.cross_entropy); vs compile: same
            against torch.compile(F.cross_entropy)
GB/s        logits bytes / median: fwd reads N*V*itemsize, fwd+bwd reads it and writes the
            gradient (2*N*V*itemsize)
% copy      GB/s as a share of out.copy_(logits) measured in the same run (read + write)
peak MiB    most memory the call held at once beyond its inputs, torch allocator only (CUDA:
            max_memory_allocated; CPU: torch.profiler memory events); fwd+bwd includes the
            gradient; n/a where it could not be measured
"""


def _bytes(cell: Cell) -> int:
    itemsize = DTYPES[cell.dtype].itemsize
    return cell.n * cell.v * cell.s * itemsize * (1 if cell.mode == "fwd" else 2)


def derive(cells: list[Cell]) -> None:
    """Fills gbps, pct_copy, vs_eager and vs_compile from the cells of the same group/mode."""
    ok = {(c.n, c.v, c.s, c.dtype, c.mode, c.impl): c for c in cells
          if c.status == "ok" and c.median_ms}
    for c in cells:
        if c.status != "ok" or not c.median_ms:
            continue
        c.gbps = _bytes(c) / (c.median_ms * 1e-3) / 1e9
        key = (c.n, c.v, c.s, c.dtype)
        copy = ok.get((*key, "copy", "copy"))
        if copy is not None and c.mode != "copy":
            c.pct_copy = 100.0 * c.gbps / (_bytes(copy) / (copy.median_ms * 1e-3) / 1e9)
        for attr, base in (("vs_eager", EAGER), ("vs_compile", COMPILE)):
            ref = ok.get((*key, c.mode, base))
            if ref is not None and c.mode != "copy":
                setattr(c, attr, ref.median_ms / c.median_ms)


def _f(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def print_tables(result: RunResult, meta: dict, file: TextIO = sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    load = meta.get("loadavg_1min")
    p(f"\n{meta['device_name']} | torch {meta['torch_version']} | "
      f"{meta['threads']} CPU threads | load average before start "
      f"{'?' if load is None else format(load, '.2f')} | {meta['date']}")
    p(LEGEND)
    for name, why in result.skipped.items():
        p(f"skipped {name}: {why}")
    groups: dict[tuple, list[Cell]] = {}
    copies: dict[tuple, Cell] = {}
    for c in result.cells:
        if c.mode == "copy":
            copies[(c.n, c.v, c.s, c.dtype)] = c
        else:
            groups.setdefault((c.n, c.v, c.s, c.dtype, c.mode), []).append(c)
    head = (f"  {'impl':<20}{'median ms':>11}{'min ms':>10}{'vs eager':>10}{'vs compile':>12}"
            f"{'GB/s':>9}{'% copy':>8}{'peak MiB':>10}{'reps':>6}")
    for (n, v, sp, dtype, mode), rows in groups.items():
        copy = copies.get((n, v, sp, dtype))
        if copy is not None and copy.status == "ok":
            copy_text = (f"copy {copy.median_ms:.3f} ms = {copy.gbps:.1f} GB/s, "
                         f"{copy.copies} input cop{'y' if copy.copies == 1 else 'ies'} rotated")
        else:
            copy_text = f"copy baseline failed: {copy.message if copy else 'missing'}"
        p(f"\n{shape_label(n, v, sp)} {dtype} {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}   "
          f"({copy_text})")
        p(head)
        for c in rows:
            if c.status != "ok":
                p(f"  {c.impl:<20}{c.status}: {c.message}")
                continue
            peak = "n/a" if c.peak_bytes is None else f"{c.peak_bytes / 2**20:.1f}"
            p(f"  {c.impl:<20}{c.median_ms:>11.3f}{c.min_ms:>10.3f}"
              f"{_f(c.vs_eager, '.2f', 'x'):>10}"
              f"{_f(c.vs_compile, '.2f', 'x'):>12}{_f(c.gbps, '.1f'):>9}"
              f"{_f(c.pct_copy, '.0f', '%'):>8}{peak:>10}{c.reps:>6}")
        compiled = [c for c in rows if c.impl == COMPILE and c.first_call_s is not None]
        if compiled:
            p(f"  (torch.compile first call, compilation included: "
              f"{compiled[0].first_call_s:.1f} s)")


def write_json(path: Path, result: RunResult, meta: dict, args: dict) -> None:
    data = {"meta": meta, "args": args, "skipped": result.skipped,
            "bytes_convention": {"fwd": "N*V*itemsize", "fwdbwd": "2*N*V*itemsize",
                                 "copy": "2*N*V*itemsize"},
            "cells": [c.as_dict() for c in result.cells]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
