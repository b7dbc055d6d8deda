"""Peak memory of one call, above what was allocated before it (the inputs).

Both devices count tensors from torch's allocator only, so the numbers compare across rows:
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
  CPU:  torch.profiler's memory events (every allocation and free of the CPU allocator, in
        order); the peak of their running sum.  Process RSS would also count the Python heap,
        allocator caching and pages never touched, so it is not used.
For fwd+bwd the gradient is allocated by the call and counted: it is part of the cost.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch


def peak_bytes(call: Callable[[], None], device: str) -> int | None:
    """Peak extra bytes during call(), or None where it cannot be measured."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        return _cpu_peak_bytes(call)
    except Exception:  # the profiler's result API is not public: degrade to "n/a"
        return None


def _cpu_peak_bytes(call: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        call()
    events = [(e.start_ns(), e.nbytes()) for e in p.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native logger prints start/stop lines on fd 2 (not through Python), which
    would break the progress bar; silence fd 2 for the profiled call only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
