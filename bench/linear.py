"""`python -m bench --modes linear`: a language-model head's loss, hidden states to loss, with
the gradients of the hidden states and the head's weight (bench/README.md, "linear").

Per (N, H, V) and dtype, for each implementation (bench/linear_impls.py): one checked call
(loss and gradients against the naive path within a loose tolerance; a mismatch is reported
as invalid and not timed), one call under torch's memory accounting (peak bytes beyond the
inputs; 'extra' also leaves out the gradients every implementation must produce, d x and
d weight), then the timed forward + backward reps.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cases import DTYPES
from .impls import Unavailable
from .linear_impls import LINEAR_IMPLS, NAIVE
from .memory import peak_bytes
from .timing import sync

CPU_SHAPES = [(4096, 2048, 32000), (1024, 2048, 128256)]
CUDA_SHAPES = [(4096, 2048, 32000), (8192, 4096, 128256)]
QUICK_SHAPES = [(300, 64, 1000), (128, 32, 4000)]
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2,
             torch.bfloat16: 5e-2}


@dataclass
class LinearCell:
    n: int
    h: int
    v: int
    dtype: str
    impl: str
    status: str = "ok"  # ok | error | invalid | skipped
    message: str = ""
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    peak_bytes: int | None = None
    extra_bytes: int | None = None  # peak_bytes minus the gradients of x and weight
    loss_err: float | None = None
    grad_err: float | None = None


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            dims = tuple(int(p) for p in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"bad shape {item!r} for --modes linear: expected NxHxV, e.g. "
                             "4096x2048x32000")
        shapes.append(dims)
    return shapes


def _inputs(n, h, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, generator=gen).to(dtype)
    w = (torch.randn(v, h, device=device, generator=gen) / h ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=gen)
    return x.requires_grad_(), w.requires_grad_(), t


def _call(fn, x, w, t):
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()
    return loss.detach()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _cell(name, fn, x, w, t, ref, device, reps) -> LinearCell:
    n, h = x.shape
    cell = LinearCell(n, h, w.shape[0], str(x.dtype).removeprefix("torch."), name)
    try:
        t0 = time.perf_counter()
        loss = _call(fn, x, w, t)
        sync(device)
        cell.first_call_s = time.perf_counter() - t0
        ref_loss, ref_dx, ref_dw = ref
        cell.loss_err = _rel(loss, ref_loss)
        cell.grad_err = max(_rel(x.grad, ref_dx), _rel(w.grad, ref_dw))
        tol = TOLERANCE[x.dtype]
        if not (cell.loss_err <= tol and cell.grad_err <= tol):
            cell.status = "invalid"
            cell.message = (f"differs from naive: loss {cell.loss_err:.1e}, grad "
                            f"{cell.grad_err:.1e} (tolerance {tol:.0e})")
            return cell
        del loss
        x.grad = w.grad = None
        cell.peak_bytes = peak_bytes(lambda: _call(fn, x, w, t), device)
        if cell.peak_bytes is not None:
            cell.extra_bytes = cell.peak_bytes - (x.numel() + w.numel()) * x.element_size()
        gc.disable()
        try:
            for _ in range(reps):
                x.grad = w.grad = None
                sync(device)
                t0 = time.perf_counter()
                _call(fn, x, w, t)
                sync(device)
                cell.times_ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            gc.enable()
        cell.median_ms = statistics.median(cell.times_ms)
        cell.min_ms = min(cell.times_ms)
    except Unavailable as e:
        cell.status, cell.message = "skipped", str(e)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        cell.status, cell.message = "error", f"{type(e).__name__}: {first}"[:300]
    finally:
        x.grad = w.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return cell


def run(device: str, shapes, dtypes: list[str], names: list[str], reps: int,
        log=print) -> list[LinearCell]:
    cells: list[LinearCell] = []
    for n, h, v in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            x, w, t = _inputs(n, h, v, dtype, device)
            _call(LINEAR_IMPLS[NAIVE](device), x, w, t)
            ref = (LINEAR_IMPLS[NAIVE](device)(x, w, t).detach(), x.grad, w.grad)
            x.grad = w.grad = None
            for name in names:
                try:
                    fn = LINEAR_IMPLS[name](device)
                except Unavailable as e:
                    cell = LinearCell(n, h, v, dname, name, status="skipped", message=str(e))
                else:
                    cell = _cell(name, fn, x, w, t, ref, device, reps)
                cells.append(cell)
                log(_line(cell))
            del x, w, t, ref
    return cells


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def _line(c: LinearCell) -> str:
    head = f"{c.n}x{c.h}x{c.v} {c.dtype} {c.impl}"
    if c.status != "ok":
        return f"{head}: {c.status} ({c.message})"
    return (f"{head}: median {c.median_ms:.0f} ms (min {c.min_ms:.0f}), peak "
            f"{_mib(c.peak_bytes)} MiB, extra {_mib(c.extra_bytes)} MiB")


def print_table(cells: list[LinearCell], out=None) -> None:
    out = out if out is not None else sys.stdout
    groups: dict[tuple, list[LinearCell]] = {}
    for c in cells:
        groups.setdefault((c.n, c.h, c.v, c.dtype), []).append(c)
    for (n, h, v, dtype), group in groups.items():
        naive = next((c for c in group if c.impl == NAIVE and c.status == "ok"), None)
        print(f"\nlinear  N={n} H={h} V={v}  {dtype}  (forward + backward, d x and d weight)",
              file=out)
        print(f"{'impl':<17}{'median ms':>10}{'min ms':>9}{'vs naive':>9}{'peak MiB':>10}"
              f"{'extra MiB':>10}{'extra/naive':>12}", file=out)
        for c in group:
            if c.status != "ok":
                print(f"{c.impl:<17}  {c.status}: {c.message}", file=out)
                continue
            speed = (f"{naive.median_ms / c.median_ms:.2f}x" if naive else "")
            ratio = (f"{c.extra_bytes / naive.extra_bytes:.2f}"
                     if naive and c.extra_bytes is not None and naive.extra_bytes else "")
            print(f"{c.impl:<17}{c.median_ms:>10.0f}{c.min_ms:>9.0f}{speed:>9}"
                  f"{_mib(c.peak_bytes):>10}{_mib(c.extra_bytes):>10}{ratio:>12}", file=out)


def write_json(path: Path, cells: list[LinearCell], info: dict, args: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": info, "args": args,
                                "cells": [asdict(c) for c in cells]}, indent=1))


def default_shapes(device: str, quick: bool):
    if quick:
        return QUICK_SHAPES
    return CUDA_SHAPES if device == "cuda" else CPU_SHAPES


def default_dtypes(device: str, quick: bool) -> list[str]:
    if quick:
        return ["float32"]
    return ["bfloat16", "float32"]
