"""Spawning a gloo process group on 127.0.0.1 for the vocab-parallel tests, bounded in time.

run_group(world, "module:function", payload) starts `world` processes (spawn), each joins a
gloo group on a free port and calls function(rank, world, payload), which returns a list of
failure messages (empty when all its cases pass).  A process that hangs or dies fails the
test, after `timeout` seconds at most.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, target, payload, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        queue.put((rank, fn(rank, world, payload)))
    except BaseException:
        queue.put((rank, [f"rank {rank}: {traceback.format_exc()}"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(world: int, target: str, payload=None, timeout: float = 240.0) -> list[str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, target, payload, queue),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    failures: list[str] = []
    got = 0
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while got < world:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                failures.append(f"timed out after {timeout} s ({got} of {world} ranks done)")
                break
            try:
                _, msgs = queue.get(timeout=min(left, 5.0))
            except Exception:  # queue.Empty: check that nobody died
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    failures.append(f"a rank died (exit code {dead[0].exitcode})")
                    break
                continue
            got += 1
            failures.extend(msgs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return failures
