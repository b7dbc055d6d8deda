"""xent_ext.CrossEntropyLoss: nn.CrossEntropyLoss's constructor, forward on the fused kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .functional import cross_entropy


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss.

    Takes the same arguments (weight, size_average, ignore_index, reduce, reduction,
    label_smoothing), holds `weight` as a buffer like the original (so `.to()` and state_dict
    behave the same), and accepts the keyword-only extensions of xent_ext.cross_entropy
    (z_loss, softcap, logit_scale, inplace_backward), applied on every call.
    """

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None,
                 logit_scale: float = 1.0, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot compile the Python layer; it calls the operator itself.
            return _scripted_cross_entropy(input, target, self.weight, self.ignore_index,
                                           self.reduction, self.label_smoothing, self.z_loss,
                                           self.softcap, self.logit_scale,
                                           self.inplace_backward)
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             logit_scale=self.logit_scale,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            extras.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            extras.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.logit_scale != 1.0:
            extras.append(f"logit_scale={self.logit_scale}")
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        return ", ".join(extras)


# typing.Optional, not `X | None`: TorchScript reads these annotations.
def _scripted_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],  # noqa: UP007
                            ignore_index: int, reduction: str, label_smoothing: float,
                            z_loss: float, softcap: Optional[float],  # noqa: UP007
                            logit_scale: float, inplace_backward: bool) -> Tensor:
    """CrossEntropyLoss.forward for TorchScript: the (N, C, S) view and one call of the forward
    operator, whose registered autograd serves scripted code.  The argument checks are the
    operator's own (C++); torch.jit.script(xent_ext.CrossEntropyLoss()) works as torch's."""
    if inplace_backward:
        raise RuntimeError("xent_ext.CrossEntropyLoss: inplace_backward=True is not supported "
                           "in TorchScript")
    codes = {"none": 0, "mean": 1, "sum": 2, "elementwise_mean": 1}
    if reduction not in codes:
        raise ValueError(reduction + " is not a valid value for reduction")
    red = codes[reduction]
    if input.dim() == 1:
        x3 = input.reshape(1, -1, 1)
        row_shape: list[int] = []
    else:
        spatial = 1
        for d in input.shape[2:]:
            spatial *= d
        x3 = input.reshape(input.shape[0], input.shape[1], spatial)
        row_shape = [input.shape[0]] + list(input.shape[2:])
    prob = target.is_floating_point() and target.shape == input.shape
    t3 = target.reshape(x3.shape) if prob else target.reshape(x3.shape[0], x3.shape[2]).long()
    cap = softcap if softcap is not None else 0.0
    compute_grad = torch.is_grad_enabled() and x3.requires_grad
    loss, lse, grad = torch.ops.xent_ext.cross_entropy_fwd(x3, t3, weight, red, ignore_index,
                                                           label_smoothing, logit_scale, cap,
                                                           z_loss, compute_grad)
    if red == 0:
        loss = loss.reshape(row_shape)
    return loss
