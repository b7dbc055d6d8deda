"""A tiny causal language model (a transformers Llama, random init) trained on byte-level
tokens of Python's own standard-library sources, with and without xent_ext.

The same model, data and seed run twice, each in a fresh process: as transformers computes the
loss, and after xent_ext.integrations.transformers.apply(model).  Each run prints its losses,
its mean step time and the memory its steps added (peak resident memory on CPU, peak allocated
on CUDA).

    python examples/tiny_causal_lm.py --steps 20 --seq 256 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from xent_ext.integrations import transformers as xent_hf

VOCAB = 256  # bytes


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to `limit` bytes of the standard library's .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        yield torch.stack([tokens[s:s + seq] for s in start.tolist()])


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=max(args.hidden // 32, 1),
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class PeakMemory:
    """Memory added at the peak of a block: CUDA's allocator counter, or on Linux the resident
    set's high-water mark (reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif os.path.exists("/proc/self/clear_refs"):
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS:")
        else:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.added = self._status("VmHWM:") - self.base
        else:
            self.added = float("nan")


def train(model, data, args, device):
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, times = [], []
    with PeakMemory(device) as mem:
        for ids in data:
            ids = ids.to(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    return losses, times, mem.added


def run_one(name: str, args) -> dict:
    device = torch.device(args.device)
    tokens = stdlib_bytes(2_000_000)
    data = list(batches(tokens, args.steps, args.batch, args.seq, args.seed))
    model = build_model(args)
    if name == "xent_ext":
        xent_hf.apply(model)
    losses, times, added = train(model, data, args, device)
    # The first step pays for warm-up: the mean is over the others.
    step = sum(times[1:]) / max(len(times) - 1, 1)
    return {"losses": losses, "step_s": step, "memory_bytes": added}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=VOCAB,
                   help="the model's vocabulary (>= 256: only the byte ids occur; a larger one "
                        "is a real model's logits size, where the fused loss saves memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["transformers", "xent_ext"],
                   help="run one configuration here and print it as JSON")
    p.add_argument("--in-process", action="store_true",
                   help="both configurations in this process: faster, but the second one's "
                        "memory and warm-up then benefit from the first")
    args = p.parse_args(argv)
    if args.vocab < VOCAB:
        p.error(f"--vocab must be at least {VOCAB} (the byte ids)")

    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return {}
    # Each configuration in a fresh process: the memory one run freed would otherwise make
    # the next one look cheaper, and its warm-up faster.
    results = {}
    for name in ("transformers", "xent_ext"):
        if args.in_process:
            results[name] = r = run_one(name, args)
        else:
            cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv),
                   "--only", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name] = r = json.loads(out.strip().splitlines()[-1])
        losses = r["losses"]
        print(f"{name:12s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  step "
              f"{r['step_s'] * 1e3:7.1f} ms  memory added {r['memory_bytes'] / 2**20:7.1f} MiB")
    diff = max(abs(a - b) for a, b in zip(results["xent_ext"]["losses"],
                                          results["transformers"]["losses"], strict=True))
    print(f"largest loss difference over {args.steps} steps: {diff:.2e}")
    return results


if __name__ == "__main__":
    main()
