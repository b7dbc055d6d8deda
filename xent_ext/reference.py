"""The lesson's cross-entropy references, written for this project.

These are deliberately naive: they are what the fused kernels are checked against for ordinary
inputs, and what they are shown to beat on extreme inputs (log of a softmax that underflowed).
"""

from __future__ import annotations

import torch
from torch import Tensor


def H(p: Tensor, q: Tensor) -> Tensor:
    """Cross entropy of predicted probabilities p against a target distribution q:
    -sum_i q_i log p_i."""
    return (-q * p.log()).sum()


def item_cross_entropy(probs: Tensor, label: int) -> Tensor:
    """One sample: -log of the probability given to the true label."""
    return -probs[label].log()


def batch_cross_entropy(probs: Tensor, labels: Tensor) -> Tensor:
    """A batch of probability rows: mean over rows of -log p[row, label]."""
    return -probs[torch.arange(labels.shape[0]), labels].log().mean()


def naive_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """log(softmax) then NLL, the textbook way: overflows / underflows on extreme logits."""
    rows = -torch.log(torch.softmax(logits, dim=1))[torch.arange(labels.shape[0]), labels]
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def make_classification_logits(n_classes: int, n_samples: int, pct_correct: float,
                               confidence: float = 1.0,
                               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Simulated logits and labels.

    Each row gets uniform logits in [-5, 5); with probability pct_correct the true label's
    logit is raised above every other (by up to `confidence`), otherwise a wrong class is made
    the largest (by up to 0.1).  Pass a seeded torch.Generator for reproducible batches.
    """
    g = generator
    logits = torch.rand(n_samples, n_classes, generator=g, dtype=torch.float64) * 10.0 - 5.0
    labels = torch.randint(0, n_classes, (n_samples,), generator=g)
    maxs = logits.abs().max(dim=1).values
    for i in range(n_samples):
        if torch.rand((), generator=g).item() <= pct_correct:
            bump = torch.rand((), generator=g, dtype=torch.float64) * confidence
            logits[i, labels[i]] = maxs[i] + bump
        else:
            others = [c for c in range(n_classes) if c != labels[i].item()]
            wrong = others[int(torch.randint(0, len(others), (), generator=g))]
            logits[i, wrong] = maxs[i] + torch.rand((), generator=g, dtype=torch.float64) / 10
    return logits.float(), labels
