"""Vocab-parallel cross entropy: time per training step and bytes communicated, 2 ranks.

    python -m bench.vocab_parallel [--rows 2048] [--vocab 32000] [--dtype float32] [--reps 5]

Three ways to the same loss and gradient of logits (N, V) split by vocabulary over a gloo
group on this machine (spawned on 127.0.0.1):
  xent_ext   xent_ext.distributed.vocab_parallel_cross_entropy (2 all-reduces, none backward)
  loss_par   torch's loss_parallel(): F.cross_entropy on a DTensor sharded on the classes
  megatron   Megatron's scheme in plain torch: all-reduces of the max, the target logit and
             the sum-exp (three), a float32 softmax saved for the backward
Each rank runs one thread.  Bytes: per rank, the size of the tensors each collective of the
step reduces (torch.distributed's calls and the functional collectives DTensor calls).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class _CountCollectives:
    """Counts the collectives a step calls, and the bytes of the tensors they reduce or
    gather: torch.distributed's (what xent_ext and the Megatron version call) and the
    functional ones DTensor calls (loss_parallel), patched for the duration."""

    _DIST = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast")
    _FUNCOL = ("all_reduce", "all_gather_tensor", "all_gather_single", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_to_all_single")

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._saved = []

    def _wrap(self, mod, name):
        orig = getattr(mod, name, None)
        if orig is None:
            return

        def counted(*a, **k):
            self.calls += 1
            t = a[0] if a else None
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
            return orig(*a, **k)

        self._saved.append((mod, name, orig))
        setattr(mod, name, counted)

    def __enter__(self):
        from torch.distributed import _functional_collectives as funcol

        for n in self._DIST:
            self._wrap(dist, n)
        for n in self._FUNCOL:
            self._wrap(funcol, n)
        return self

    def __exit__(self, *exc):
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)


class _Megatron(torch.autograd.Function):
    """Megatron-LM's vocab-parallel cross entropy, in plain torch ('mean' over all rows)."""

    @staticmethod
    def forward(ctx, local, target, vocab_start, group):
        x = local.float()
        m = x.amax(1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        x = x - m.unsqueeze(1)
        t = target - vocab_start
        owned = (t >= 0) & (t < x.shape[1])
        idx = torch.where(owned, t, torch.zeros_like(t))
        pred = torch.where(owned, x.gather(1, idx.unsqueeze(1)).squeeze(1),
                           torch.zeros_like(m))
        dist.all_reduce(pred, group=group)
        exp = x.exp_()
        s = exp.sum(1)
        dist.all_reduce(s, group=group)
        loss = (s.log() - pred).mean()
        exp.div_(s.unsqueeze(1))  # the softmax, float32, saved
        ctx.save_for_backward(exp, idx, owned)
        ctx.dtype = local.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, idx, owned = ctx.saved_tensors
        grad = p.clone()
        grad.scatter_add_(1, idx.unsqueeze(1), -owned.to(grad.dtype).unsqueeze(1))
        return (grad * (g / p.shape[0])).to(ctx.dtype), None, None, None


def _step(name, local, target, vocab_start, mesh):
    import xent_ext.distributed as xd

    x = local.detach().requires_grad_()
    if name == "xent_ext":
        loss = xd.vocab_parallel_cross_entropy(x, target, vocab_start=vocab_start)
    elif name == "megatron":
        loss = _Megatron.apply(x, target, vocab_start, None)
    else:
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.parallel import loss_parallel

        xd_ = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
        with loss_parallel():
            loss = torch.nn.functional.cross_entropy(xd_, target)
            loss.backward()
        return loss.to_local().detach(), x.grad
    loss.backward()
    return loss.detach(), x.grad


def _worker(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    v = args.vocab // world
    full = torch.randn(args.rows, args.vocab, generator=g).to(dtype)
    target = torch.randint(0, args.vocab, (args.rows,), generator=g)
    local = full[:, rank * v:(rank + 1) * v].contiguous()
    out = {}
    ref = None
    for name in ("xent_ext", "loss_par", "megatron"):
        loss, grad = _step(name, local, target, rank * v, mesh)  # warm-up, checked
        if ref is None:
            ref = (loss, grad)
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 2e-2  # half: 1 rounding
        # the gradient against the largest entry (entries of p / N are tiny for 'mean')
        err = (grad.float() - ref[1].float()).abs().max() / ref[1].float().abs().max()
        ok = torch.allclose(loss.float(), ref[0].float(), rtol=tol, atol=tol) and bool(err <= tol)
        counter = _CountCollectives()
        with counter:
            _step(name, local, target, rank * v, mesh)
        times = []
        for _ in range(args.reps):
            dist.barrier()
            t0 = time.perf_counter()
            _step(name, local, target, rank * v, mesh)
            times.append(time.perf_counter() - t0)
        out[name] = {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                     "collectives": counter.calls, "bytes": counter.bytes, "agrees": ok}
    queue.put((rank, out))
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vocab_parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue))
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    r0 = results[0]
    print(f"vocab-parallel CE, {args.world} ranks (gloo, 1 thread each), N={args.rows}, "
          f"V={args.vocab} ({args.vocab // args.world} per rank), {args.dtype}, "
          f"forward+backward, median of {args.reps}")
    print("| impl | median ms (rank 0 / max over ranks) | min ms | collectives | KiB sent per "
          "rank | agrees |")
    print("|---|---|---|---|---|---|")
    for name, m in r0.items():
        worst = max(results[r][name]["ms"] for r in results)
        print(f"| {name} | {m['ms']:.1f} / {worst:.1f} | {m['min_ms']:.1f} | "
              f"{m['collectives']} | {m['bytes'] / 1024:.1f} | {m['agrees']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
