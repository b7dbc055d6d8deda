"""The loss of the forward op written with differentiable PyTorch operations.

Same arguments and semantics as torch.ops.xent_ext.cross_entropy_fwd (input (N, C, S), target
(N, S) class indices or (N, C, S) probabilities, the LLM options), but every step is an ATen
operation with its own derivatives, so it composes with everything autograd offers: it is what
xent_ext.cross_entropy runs under torch.func transforms (grad, vmap, jacrev, hessian) and
forward-mode AD, and what the fused op's backward differentiates when a graph of the backward
is being built (create_graph=True: double backward, gradient penalties, Hessian-vector
products).  The fused kernels stay the fast path for everything else.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REDUCTION_NONE, _REDUCTION_MEAN = 0, 1


def transformed(x: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """y = logit_scale * x, then softcap * tanh(y / softcap) when softcap > 0; -inf stays -inf
    (a masked entry gets no probability mass under any scale or cap)."""
    y = x * logit_scale if logit_scale != 1.0 else x
    if softcap > 0:
        y = softcap * torch.tanh(y / softcap)
    if softcap > 0 or logit_scale <= 0:
        y = torch.where(torch.isneginf(x), x, y)
    return y


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, reduction: int,
                  ignore_index: int, label_smoothing: float, logit_scale: float, softcap: float,
                  z_loss: float) -> tuple[Tensor, Tensor]:
    """(loss reduced and rounded to the input dtype, lse (N, S) in the accumulation dtype)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    n, c, s = input.shape
    y = transformed(input.to(acc), logit_scale, softcap)
    lse = torch.logsumexp(y, dim=1)
    logp = y - lse.unsqueeze(1)
    eps = label_smoothing
    w = weight.to(acc).view(1, c, 1) if weight is not None else None
    if target.is_floating_point():
        coef = (1.0 - eps) * target.to(acc) + eps / c
        if w is not None:
            coef = coef * w
        rows = -(coef * logp).sum(1)
        if z_loss > 0:
            rows = rows + z_loss * lse * lse
        divisor = rows.new_full((), float(n * s))
    else:
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        if w is not None:
            w_t = weight.to(acc)[safe]
        else:
            w_t = torch.ones_like(nll)
        zero = torch.zeros_like(nll)
        w_t = torch.where(valid, w_t, zero)
        rows = (1.0 - eps) * torch.where(valid, w_t * nll, zero)
        if eps > 0:
            smooth = -(logp * w).sum(1) if w is not None else -logp.sum(1)
            rows = rows + eps / c * torch.where(valid, smooth, zero)
        if z_loss > 0:
            rows = rows + torch.where(valid, z_loss * lse * lse, zero)
        divisor = w_t.sum()
    if reduction == _REDUCTION_NONE:
        loss = rows
    elif reduction == _REDUCTION_MEAN:
        loss = rows.sum() / divisor
    else:
        loss = rows.sum()
    return loss.to(input.dtype), lse.detach()
