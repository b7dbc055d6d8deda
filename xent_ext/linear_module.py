"""xent_ext.LinearCrossEntropyLoss: a language-model head and its loss in one module."""

from __future__ import annotations

from torch import Tensor, nn

from .linear import linear_cross_entropy


class LinearCrossEntropyLoss(nn.Module):
    """loss = cross_entropy(head(hidden), target), the logits never held in full.

    Holds the head's parameters (`weight` (V, H), `bias` (V,) or None) or borrows them:
    `LinearCrossEntropyLoss.from_linear(model.lm_head)` shares the nn.Linear's parameters (the
    same Parameter objects: tied embeddings, optimizers and state_dicts keep working), so a
    model's `lm_head` + `CrossEntropyLoss` is swapped for one call, forward(hidden, target).
    Every option of xent_ext.linear_cross_entropy is a constructor argument (`class_weight`
    is held as a buffer, as nn.CrossEntropyLoss holds `weight`).
    """

    def __init__(self, in_features: int | None = None, num_classes: int | None = None,
                 bias: bool = True, *, weight: nn.Parameter | None = None,
                 bias_param: nn.Parameter | None = None, class_weight: Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                 logit_scale: float = 1.0, chunk_size: int | None = None,
                 chunk_bytes: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if weight is None:
            if in_features is None or num_classes is None:
                raise TypeError("LinearCrossEntropyLoss: give in_features and num_classes, or "
                                "weight= (or use LinearCrossEntropyLoss.from_linear)")
            # nn.Linear's initialisation, so a fresh head starts as torch's would.
            head = nn.Linear(in_features, num_classes, bias, device=device, dtype=dtype)
            weight, bias_param = head.weight, head.bias
        self.weight = weight
        self.bias = bias_param
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> LinearCrossEntropyLoss:
        """A loss that borrows `linear`'s weight and bias (shared, not copied)."""
        return cls(weight=linear.weight, bias_param=linear.bias, **options)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input, self.weight, target, self.bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            logit_scale=self.logit_scale, chunk_size=self.chunk_size,
            chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        v, h = self.weight.shape
        extras = [f"in_features={h}", f"num_classes={v}", f"bias={self.bias is not None}",
                  f"reduction={self.reduction!r}"]
        for name in ("label_smoothing", "z_loss", "chunk_size", "chunk_bytes"):
            if getattr(self, name):
                extras.append(f"{name}={getattr(self, name)}")
        if self.softcap is not None:
            extras.append(f"softcap={self.softcap}")
        if self.logit_scale != 1.0:
            extras.append(f"logit_scale={self.logit_scale}")
        return ", ".join(extras)
