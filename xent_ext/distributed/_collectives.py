"""The collectives of the vocab-parallel loss, in one place.

Eager calls use torch.distributed's in-place all_reduce (gloo, NCCL, any backend); under
torch.compile the functional collectives, which the compiler traces into the graph.  Nothing
else here communicates, so a test can count every collective by wrapping these.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import Tensor

_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def all_reduce(t: Tensor, op: str, group) -> Tensor:
    """t reduced over the group (op 'max' or 'sum'); in place when eager."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, op, group if group is not None else dist.group.WORLD)
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t


_layout_lock = threading.Lock()
_layouts: dict[tuple, tuple[int, int]] = {}


def shard_layout(group, num_local: int, device: torch.device) -> tuple[int, int]:
    """(vocab_start, vocab_size) of this rank's slice, from an all-gather of every rank's
    number of classes (ranks in order).  Cached per group and local size: a group's sharding
    is taken to be fixed for a given local size (pass vocab_start when it is not)."""
    pg = group if group is not None else dist.group.WORLD
    key = (id(pg), num_local, device.type)
    with _layout_lock:
        hit = _layouts.get(key)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling():
        raise RuntimeError("vocab_parallel_cross_entropy: under torch.compile pass vocab_start "
                           "(or call once eagerly first): inferring it needs an all-gather "
                           "read on the host")
    world = dist.get_world_size(pg)
    mine = torch.tensor([num_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=pg)
    counts = [int(s.item()) for s in sizes]  # once per group and size
    rank = dist.get_rank(pg)
    layout = (sum(counts[:rank]), sum(counts))
    with _layout_lock:
        _layouts[key] = layout
    return layout


def clear_layout_cache() -> None:
    with _layout_lock:
        _layouts.clear()
