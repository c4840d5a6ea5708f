"""Barlow Twins for volumes (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021) on pooled 3D embeddings of any backbone: two augmented views (the same
views as `simclr`), a two-layer projector, and the cross-correlation of the views' projections,
standardised over the global batch, pulled towards the identity
(`ssl_models.core.losses.GlobalBarlowTwinsLoss`: world-size invariant).

Registered in config.py: `METHODS.register_lazy("barlow_twins", ...:BarlowTwins3D, options=...)`.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_models.core.losses import BarlowTwinsOptions, GlobalBarlowTwinsLoss
from ssl_models.core.modules import DataSide
from ssl_models.medical3d.methods import _VolumeMethod, freeze_unused_norms
from ssl_models.medical3d.views import TwoViews, contrastive_views


class BarlowTwins3D(_VolumeMethod):
    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder, options: BarlowTwinsOptions) -> None:
        super().__init__(encoder, options)
        from lightly.models.modules.heads import ProjectionHead

        dim, hidden = encoder.dim, 2 * encoder.dim
        norm = nn.BatchNorm1d(hidden) if options.head_batch_norm else None
        self.head = ProjectionHead([(dim, hidden, norm, nn.ReLU()), (hidden, options.projection_dim, None, None)])
        self.loss = GlobalBarlowTwinsLoss(lambda_param=options.lambda_param)
        freeze_unused_norms(self)

    def data_side(self) -> DataSide:
        return TwoViews(contrastive_views(self.encoder().cfg.size))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        encoder = self.encoder()
        return self.loss(self.head(encoder({"image": batch["view_1"]})), self.head(encoder({"image": batch["view_2"]})))
