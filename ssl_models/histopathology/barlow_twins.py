"""Barlow Twins for tiles (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021): the two views' projections are standardised over the batch and their
cross-correlation matrix is pulled towards the identity, so each dimension agrees across views
and differs from the others. No negatives, no teacher; the global batch's statistics make it
world-size invariant (`ssl_models.core.losses.GlobalBarlowTwinsLoss`).

Registered in config.py: `METHODS.register_lazy("barlow_twins", ...:BarlowTwins, options=BarlowTwinsOptions)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ssl_models.core.config import require
from ssl_models.core.losses import GlobalBarlowTwinsLoss
from ssl_models.histopathology.config import AugmentConfig
from ssl_models.histopathology.methods import TileMethod, two_layer_head


@dataclass
class BarlowTwinsOptions:
    # the paper's projector is 3 x 8192 wide; a CPU run uses a narrower one (wider helps on GPUs)
    projection_dim: int = 256
    lambda_param: float = 5e-3  # weight of the off-diagonal (redundancy) terms, the paper's
    head_batch_norm: bool = True  # BatchNorm in the projector (see SimCLROptions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be positive")
        require(self.lambda_param >= 0, f"{where}.lambda_param", "must be zero or positive")


class BarlowTwins(TileMethod):
    """Two augmented views of each tile; lightly-style two-layer projector; Barlow Twins loss."""

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder, options: BarlowTwinsOptions) -> None:
        super().__init__(encoder, options)
        self.head = two_layer_head((encoder.dim, 2 * encoder.dim, options.projection_dim), options.head_batch_norm)
        self.criterion = GlobalBarlowTwinsLoss(lambda_param=options.lambda_param)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(self.head(self.backbone(batch["first"])), self.head(self.backbone(batch["second"])))
