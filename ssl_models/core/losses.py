"""Losses that must not depend on how a global batch is split over processes.

lightly's `BarlowTwinsLoss(gather_distributed=True)` all-reduces the cross-correlation matrix but
standardises each process' embeddings with that process' own batch mean and variance, so two
processes with half a batch each do not compute what one process computes with all of it. The
paper's implementation (Zbontar et al., ICML 2021) standardises with a BatchNorm converted to
SyncBatchNorm: statistics of the global batch. `GlobalBarlowTwinsLoss` does that with autograd-aware
all-reduces (`torch.distributed.nn`), and keeps lightly's loss terms and weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightly.loss import BarlowTwinsLoss
from torch.distributed import nn as dist_nn

from ssl_models.core.config import require

EPS = 1e-5  # F.batch_norm's default, as lightly's standardisation uses


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every process, with gradients flowing back to each share."""
    return dist_nn.all_reduce(tensor) if _world() > 1 else tensor


class GlobalBarlowTwinsLoss(BarlowTwinsLoss):
    """Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML 2021): the cross-correlation of the two views' embeddings, standardised over
    the global batch, is pulled towards the identity; `lambda_param` weighs the off-diagonal
    (redundancy) terms. Identical for any number of processes sharing the batch."""

    def __init__(self, lambda_param: float = 5e-3) -> None:
        super().__init__(lambda_param=lambda_param, gather_distributed=False)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z_a.device.type, enabled=False):  # float64 under a bf16 autocast too
            return self._loss(z_a, z_b).to(z_a.dtype)

    def _loss(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        # in float64: the sums over the batch split differently over processes, and in float32 their
        # rounding, amplified by Adam on weights of near-zero gradient, moved weights by ~5e-5 in 3 steps
        count = _summed(torch.tensor(float(z_a.shape[0]), device=z_a.device, dtype=torch.float64))
        standardised = []
        for z in (z_a.double(), z_b.double()):
            mean = _summed(z.sum(dim=0)) / count
            variance = _summed((z - mean).square().sum(dim=0)) / count  # biased, as batch norm's
            standardised.append((z - mean) / torch.sqrt(variance + EPS))
        correlation = _summed(standardised[0].T @ standardised[1]) / count
        on_diagonal = torch.diagonal(correlation).add(-1).pow(2).sum()
        off_diagonal = correlation.flatten()[:-1].view(correlation.shape[0] - 1, -1)[:, 1:].pow(2).sum()
        return on_diagonal + self.lambda_param * off_diagonal


@dataclass
class BarlowTwinsOptions:
    """A domain's `barlow_twins` options (a domain adds its own, e.g. the augmentations)."""

    projection_dim: int = 256  # the paper's projector is 3 x 8192 wide; a CPU run uses a narrower one
    lambda_param: float = 5e-3  # weight of the off-diagonal (redundancy) terms, the paper's
    head_batch_norm: bool = True  # BatchNorm in the projector (off where a CPU run must not depend on the split)

    def validate(self, where: str) -> None:
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be positive")
        require(self.lambda_param >= 0, f"{where}.lambda_param", "must be zero or positive")
