"""xent_ext.cross_entropy on DTensor logits sharded on the class dimension.

What torch's loss_parallel() computes, on the vocab-parallel kernels: exactly one mesh dim
shards the classes (the "TP" dim: Shard(1), or Shard(0) for a (C,) input); the other mesh dims
are Replicate or shard another dimension (data parallel).  The target is a DTensor with the
derived placements (the TP dim Replicate, other Shard(d) shifted past the class dim), or a plain
tensor when those are all Replicate; a weight is replicated (a DTensor, or the full vector).

Returned, as loss_parallel: a DTensor whose placements follow the reduction: 'none' the
target's placements; 'sum' Replicate on the TP dim, Partial('sum') on the other Shard dims;
'mean' fully replicated, on any mesh (loss_parallel allows 'mean' on a 1-D mesh only: here the
numerator and the divisor are also summed over the data-parallel mesh dims, one more all-reduce
per such dim).  Unlike loss_parallel, label smoothing and the language-model options work too;
return_lse gives the per-row lse as a DTensor placed like 'none'.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn import _reduction as _legacy_reduction

from ._vocab import vocab_parallel_cross_entropy


def _tp_mesh_dim(placements, class_dim: int) -> int:
    tp = [i for i, p in enumerate(placements) if p.is_shard(class_dim)]
    if len(tp) != 1:
        raise NotImplementedError(
            f"cross_entropy on a DTensor needs its class dimension {class_dim} sharded on "
            f"exactly one mesh dim, got placements {tuple(placements)}")
    for p in placements:
        if p.is_partial():
            raise NotImplementedError("cross_entropy on a DTensor: Partial placements of the "
                                      f"logits are not supported, got {tuple(placements)}")
    return tp[0]


def _target_placements(placements, tp: int, class_dim: int):
    out = []
    for i, p in enumerate(placements):
        if i == tp or not p.is_shard():
            out.append(Replicate())
        else:
            out.append(Shard(p.dim - 1 if p.dim > class_dim else p.dim))
    return tuple(out)


def _local_target(target, placements, mesh) -> Tensor:
    if isinstance(target, DTensor):
        if tuple(target.placements) != placements:
            target = target.redistribute(mesh, placements)
        return target.to_local()
    if any(p.is_shard() for p in placements):
        raise RuntimeError(f"cross_entropy on a DTensor: pass the target as a DTensor with "
                           f"placements {placements} (a plain tensor is ambiguous where the "
                           "batch is sharded)")
    return target


def cross_entropy(input: DTensor, target, weight, ignore_index: int, reduction: str,
                  label_smoothing: float, *, z_loss: float, return_z_loss: bool, softcap,
                  logit_scale: float, return_lse: bool, inplace_backward: bool):
    mesh = input.device_mesh
    placements = tuple(input.placements)
    class_dim = 0 if input.dim() == 1 else 1
    tp = _tp_mesh_dim(placements, class_dim)
    t_place = _target_placements(placements, tp, class_dim)
    t_local = _local_target(target, t_place, mesh)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if weight is not None and weight.numel() != input.shape[class_dim]:
        raise RuntimeError(f"weight tensor should be defined either for all "
                           f"{input.shape[class_dim]} classes or no classes but got weight "
                           f"tensor of shape: {list(weight.shape)}")
    _, offset = compute_local_shape_and_global_offset(input.shape, mesh, placements)
    local = input.to_local()
    if local.dim() > 1:
        local = local.movedim(1, -1)  # the kernels take the classes last
    batch_dims = [i for i, p in enumerate(placements) if i != tp and p.is_shard()]
    # torch's own mapping (the deprecated 'elementwise_mean' is 'mean', with its warning)
    red = {0: "none", 1: "mean", 2: "sum"}[_legacy_reduction.get_enum(reduction)]
    out = vocab_parallel_cross_entropy(
        local, t_local, group=mesh.get_group(tp), vocab_start=int(offset[class_dim]),
        weight=weight, ignore_index=ignore_index, reduction=red,
        label_smoothing=label_smoothing, z_loss=z_loss, return_z_loss=return_z_loss,
        softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
        inplace_backward=inplace_backward, _vocab_size=int(input.shape[class_dim]),
        _mean_groups=[mesh.get_group(i) for i in batch_dims] if red == "mean" else None)
    outs = list(out) if isinstance(out, tuple) else [out]
    if red == "none":
        loss_place = t_place
    elif red == "sum":
        loss_place = tuple(Replicate() if i == tp else Partial() if p.is_shard() else
                           Replicate() for i, p in enumerate(placements))
    else:
        loss_place = (Replicate(),) * mesh.ndim
    wrapped = [DTensor.from_local(outs[0], mesh, loss_place, run_check=False)]
    if return_z_loss:
        wrapped.append(DTensor.from_local(outs[1], mesh, loss_place, run_check=False))
    if return_lse:
        wrapped.append(DTensor.from_local(outs[-1], mesh, t_place, run_check=False))
    return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


__all__ = ["cross_entropy", "is_dtensor"]
