"""A tensor-parallel language-model head trained with xent_ext's vocab-parallel loss.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py

Each rank holds a slice of the head's rows (of the vocabulary); the loss and the gradients are
those of the whole head.  Three ways to write the same step: the local logits and
vocab_parallel_cross_entropy; the fused, chunked vocab_parallel_linear_cross_entropy; and a
DTensor sharded on the class dim through xent_ext.cross_entropy.  Runs on CPU (gloo), or on
CUDA (NCCL) when every rank has a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import xent_ext
import xent_ext.distributed as xd


class ToTensorParallel(torch.autograd.Function):
    """Identity forward; the backward sums the input's gradient over the ranks (each rank's
    head slice sent back only its part of it).  Megatron's "copy to the tensor-parallel
    region"; the fused linear loss does this all-reduce itself."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


def main() -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    vocab, hidden, tokens = 1000, 64, 256

    torch.manual_seed(0)  # the same full model and batch on every rank
    embed = torch.nn.Embedding(vocab, hidden).to(device)
    head = torch.randn(vocab, hidden, device=device) * hidden ** -0.5
    # This rank's rows of the head: uneven slices are fine (1000 over 3 ranks, say).
    bounds = [vocab * r // world for r in range(world + 1)]
    local_head = head[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
    tokens_in = torch.randint(0, vocab, (4, tokens // 4), device=device)
    target = torch.roll(tokens_in, -1, dims=1)
    target[:, -1] = -100  # nothing to predict after the last token

    opt = torch.optim.SGD(list(embed.parameters()) + [local_head], lr=0.5)
    for step in range(5):
        h = embed(tokens_in)                                      # (B, T, H), replicated
        if step % 2 == 0:
            local_logits = ToTensorParallel.apply(h) @ local_head.t()  # (B, T, V_local)
            loss = xd.vocab_parallel_cross_entropy(local_logits, target, label_smoothing=0.1,
                                                   z_loss=1e-4)
        else:
            loss = xd.vocab_parallel_linear_cross_entropy(h, local_head, target,
                                                          label_smoothing=0.1, z_loss=1e-4)
        opt.zero_grad()
        loss.backward()
        # The embedding's gradient is the whole model's on every rank (d input all-reduced);
        # each rank updates its own head rows.
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    # A loss through a DTensor sharded on the classes, as torch's loss_parallel takes it (the
    # trained embedding is the same on every rank; the initial full head stands in here).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (world,))
    with torch.no_grad():
        full_logits = (embed(tokens_in) @ head.t()).reshape(-1, vocab)
    logits = distribute_tensor(full_logits, mesh, [Shard(1)])
    loss = xent_ext.cross_entropy(logits, target.reshape(-1), label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(full_logits, target.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss.full_tensor(), ref)
    if rank == 0:
        print(f"DTensor loss {loss.full_tensor().item():.4f} = F.cross_entropy {ref.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
