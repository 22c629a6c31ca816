"""The SimCLR objective's parts: the NT-Xent loss and the projection head (dropped after training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over 2B views (positives: the other view)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class ProjectionHead(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, 2 * d_in), torch.nn.GELU(), torch.nn.Linear(2 * d_in, d_out)
        )

    def forward(self, x):
        return self.net(x)
