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

from ssl_models.core import losses as core_losses
from ssl_models.core.losses import GlobalBarlowTwinsLoss
from ssl_models.histopathology.config import AugmentConfig
from ssl_models.histopathology.methods import TileMethod, two_layer_head


@dataclass
class BarlowTwinsOptions(core_losses.BarlowTwinsOptions):
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class BarlowTwins(TileMethod):
    """Two augmented views of each tile; lightly-style two-layer projector; Barlow Twins loss."""

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder, options: BarlowTwinsOptions) -> None:
        super().__init__(encoder, options)
        self.head = two_layer_head((encoder.dim, 2 * encoder.dim, options.projection_dim), options.head_batch_norm)
        self.criterion = GlobalBarlowTwinsLoss(lambda_param=options.lambda_param)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(self.head(self.backbone(batch["first"])), self.head(self.backbone(batch["second"])))
