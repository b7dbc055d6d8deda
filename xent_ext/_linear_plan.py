"""How the fused linear + cross-entropy tiles its logits, from a memory budget in bytes.

Two strategies, both exact (every option, every reduction):

- rows (_linear_chunks.py): chunks of R rows x all V classes.  Three GEMMs, as the unfused
  path: the logits, d input and d weight.  d weight sums over the chunks, which for a
  half-precision weight takes a float32 accumulator of the weight's size (V x H x 4 bytes),
  unless the batch is one chunk.
- slabs (_class_slabs.py): the logits of every row for a slab of S classes at a time (rows
  in pieces when N x S does not fit).  A statistics pass (one GEMM) gives each row's
  log-sum-exp; the gradient pass recomputes each slab's logits, so d weight of a slab is one
  GEMM over all its rows (complete, rounded once: no accumulator of the weight's size) and d
  input is accumulated over the slabs (in float32, N x H x 4 bytes, for half inputs).  Four
  GEMMs: about a third more GEMM time than rows.

plan() takes rows whenever its logits buffer and accumulator fit the budget (one chunk, or
chunks of at least MIN_CHUNK_ROWS rows whose accumulator, if any, fits), or when chunk_size
asks for rows; slabs otherwise.  The budget (chunk_bytes; default_budget() by device and dtype)
bounds the logits buffer of either strategy.

Default budgets (bench/RESULTS.md, "CPU, linear mode"): on the CPU 32 MiB for 16-bit dtypes and
12 MiB for float32 and float64.  Half precision there pays one extra pass over d input's
float32 accumulator per slab (the CPU BLAS has no half x half -> float32 GEMM, so each slab's
product goes through a half temporary and an add), which slabs of a few thousand classes
amortise: at 4096 x 2048 x 32000 bfloat16, slabs of 1024 classes took 1.3x the time of slabs
of 8192.  float32 and float64 accumulate inside the GEMM (beta = 1) and run as fast with
slabs of 1024 classes, so their budget stays smaller.  On CUDA 256 MiB: large chunks keep
cuBLAS's GEMMs large, and cuBLAS writes the float32 weight-gradient accumulator itself (addmm
with out_dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_CHUNK_BYTES_HALF = 32 << 20
CPU_CHUNK_BYTES = 12 << 20
OTHER_CHUNK_BYTES = 256 << 20
# The fewest rows of a rows chunk: fewer make the weight-gradient GEMM (inner dimension =
# chunk rows) memory-bound on its V x H output, and on CUDA leave the GEMMs too small.
MIN_CHUNK_ROWS = 256
# The fewest classes of a slab, for the same reason (the inner dimension of the d input GEMM),
# and the fewest rows of a slab's row piece (that of its d weight GEMM).
MIN_SLAB_CLASSES = 256
MIN_SLAB_ROWS = 256


@dataclass(frozen=True)
class Plan:
    """rows: rows per chunk (rows strategy) or per piece (slabs); slab: classes per slab, 0
    for the rows strategy."""

    rows: int
    slab: int


def default_budget(device: torch.device, dtype: torch.dtype) -> int:
    if device.type != "cpu":
        return OTHER_CHUNK_BYTES
    return CPU_CHUNK_BYTES_HALF if dtype.itemsize == 2 else CPU_CHUNK_BYTES


def chunk_rows(n: int, v: int, dtype: torch.dtype, chunk_size: int | None,
               chunk_bytes: int | None) -> int:
    """Rows per chunk of the rows strategy: chunk_size when given, else as many rows of
    logits as fit in chunk_bytes (default: the CPU's budget for dtype), at least MIN_CHUNK_ROWS,
    rounded down to a multiple of 64 rows above that (GEMM tiles); never more than n (and
    at least 1)."""
    if chunk_size is not None:
        rows = chunk_size
    else:
        budget = default_budget(torch.device("cpu"), dtype) if chunk_bytes is None else \
            chunk_bytes
        rows = budget // max(1, v * dtype.itemsize)
        rows = max(MIN_CHUNK_ROWS, rows // 64 * 64)
    return max(1, min(rows, n))


def slab_tiles(n: int, v: int, itemsize: int, budget: int) -> Plan:
    """Classes per slab and rows per piece for logits tiles of at most `budget` bytes (but
    never below MIN_SLAB_CLASSES x MIN_SLAB_ROWS): all rows when a slab of the fewest classes
    holds them, slabs a multiple of 64 classes."""
    n1, v1 = max(n, 1), max(v, 1)
    per_row = budget // itemsize
    if per_row // n1 >= MIN_SLAB_CLASSES:
        slab = max(MIN_SLAB_CLASSES, per_row // n1 // 64 * 64)
        return Plan(rows=n1, slab=min(slab, v1))
    slab = min(MIN_SLAB_CLASSES, v1)
    rows = max(MIN_SLAB_ROWS, per_row // slab // 64 * 64)
    return Plan(rows=min(rows, n1), slab=slab)


def plan(n: int, v: int, h: int, dtype: torch.dtype, device: torch.device,
         chunk_size: int | None, chunk_bytes: int | None, need_weight: bool) -> Plan:
    """The strategy and its tiles for a call (see the module docstring)."""
    budget = default_budget(device, dtype) if chunk_bytes is None else chunk_bytes
    if chunk_size is not None:
        return Plan(rows=max(1, min(chunk_size, n)), slab=0)
    rows = chunk_rows(n, v, dtype, None, budget)
    half = dtype in (torch.float16, torch.bfloat16)
    accumulator = 4 * v * h if need_weight and half and rows < n else 0
    if rows * v * dtype.itemsize + accumulator <= budget:
        return Plan(rows=rows, slab=0)
    return slab_tiles(n, v, dtype.itemsize, budget)
