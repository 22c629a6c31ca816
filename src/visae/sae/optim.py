"""The recipe's optimiser and schedules: Adam, the LR warm-up and the sparsity coefficient's warm-up."""

from __future__ import annotations

import torch


def make_adam(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.Adam:
    """The recipe's Adam, as the single fused kernel (one pass over each parameter instead of
    ~8) where this torch has it for the parameters' device; the plain loop otherwise. Same
    update rule (results differ from the loop only in rounding)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up from lr/warmup at step 0 to lr at step warmup−1, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def sparsity_at(step: int, coeff: float, warmup: int) -> float:
    """λ warms up linearly over its own number of steps, like the LR."""
    return coeff * min(1.0, (step + 1) / warmup) if warmup > 0 else coeff
