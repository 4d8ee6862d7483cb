"""Element-wise update rules as pure tensor functions (in place on the state they are given)."""

from __future__ import annotations

import math
from typing import Tuple

import torch


def momentum_direction(
    grad: torch.Tensor, momentum_buffer: torch.Tensor, beta: float, nesterov: bool
) -> torch.Tensor:
    """EMA momentum M ← βM + (1−β)G (in place) and the matrix to orthogonalize: the Nesterov blend
    (1−β)G + βM, or M itself. The EMA form is Keller Jordan's and HTMuon's; for the orthogonalized
    updates any positive rescaling is irrelevant, for HTMuon's unnormalised σᵖ it is not."""
    momentum_buffer.lerp_(grad, 1 - beta)
    return grad.lerp(momentum_buffer, beta) if nesterov else momentum_buffer.clone()


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, the same arithmetic as torch.optim.AdamW (foreach=False), so it can be its oracle."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def clip_coefficient(max_norm: float, total_norm: float) -> float:
    """The factor that scales gradients of global norm `total_norm` to at most `max_norm` (Megatron's and
    torch's clip_grad_norm: max_norm / (total_norm + 1e-6), never above 1)."""
    return min(1.0, max_norm / (total_norm + 1.0e-6))
