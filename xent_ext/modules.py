"""xent_ext.CrossEntropyLoss: nn.CrossEntropyLoss's constructor, forward on the fused kernels."""

from __future__ import annotations

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
