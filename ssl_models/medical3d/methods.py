"""Self-supervised objectives for 3D volumes, one `nn.Module` each: `forward(batch) -> loss`.

Augmentations are MONAI transforms whose random state is drawn from torch's generator at
every batch, so a run resumed from a checkpoint (which restores that generator) sees the
same views as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from ssl_models.core.modules import PretrainMethod
from ssl_models.medical3d.config import VolumeModelConfig
from ssl_models.medical3d.models import (
    build_backbone,
    feature_dim,
    images_of,
    pooled_features,
)


def _reseed(transform: Any) -> Any:
    transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,))))
    return transform


def _apply(transform: Any, images: torch.Tensor) -> torch.Tensor:
    """A per-volume MONAI transform over a batch [B, 1, ...], reseeded from torch's generator."""
    _reseed(transform)
    return torch.stack([torch.as_tensor(transform(image)) for image in images]).float()


def inpainting_views(size: int):
    """MONAI's self-supervised recipe (the `ssl` tutorial, after Tang et al., "Self-Supervised
    Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022): small holes
    dropped, the outside of larger boxes dropped, and patches shuffled; scaled to `size`."""
    from monai.transforms import Compose, RandCoarseDropout, RandCoarseShuffle

    small, large = max(2, size // 10), max(4, size // 3)
    return Compose([
        RandCoarseDropout(prob=1.0, holes=6, spatial_size=small, max_spatial_size=size // 3, dropout_holes=True),
        RandCoarseDropout(prob=1.0, holes=6, spatial_size=large, max_spatial_size=size, dropout_holes=False),
        RandCoarseShuffle(prob=0.8, holes=10, spatial_size=max(2, size // 8)),
    ])


def contrastive_views(size: int):
    """Crop-and-resize, flips, intensity scale/shift and noise: SimCLR's recipe in 3D."""
    from monai.transforms import (
        Compose,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSpatialCrop,
        Resize,
    )

    return Compose([
        RandSpatialCrop(roi_size=int(size * 0.6), max_roi_size=size, random_size=True),
        Resize(spatial_size=(size, size, size), mode="trilinear"),
        RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1), RandFlip(prob=0.5, spatial_axis=2),
        RandScaleIntensity(factors=0.2, prob=0.8), RandShiftIntensity(offsets=0.1, prob=0.8),
        RandGaussianNoise(prob=0.5, std=0.05),
    ])


class _VolumeMethod(PretrainMethod):
    backbone: nn.Module

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"image": images_of(samples)}

    @torch.no_grad()
    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return pooled_features(self.backbone, images_of(samples))


class InpaintingContrastive(_VolumeMethod):
    """MONAI's ViT auto-encoder recipe: reconstruct the clean volume from two corrupted views
    (L1), plus NT-Xent between the views' pooled embeddings (lightly's loss, which gathers
    across GPUs, in place of MONAI's ContrastiveLoss). The decoder maps each token to its
    patch's voxels: MONAI's ViTAutoEnc decoder (transposed convolutions) needs a square
    patch size (4, 16), which would force 512 or 8 tokens on a 32-voxel cube."""

    def __init__(self, cfg: VolumeModelConfig, contrastive_weight: float = 0.1, temperature: float = 0.5) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.patch_size ** 3)
        self.views = inpainting_views(cfg.size)
        self.head = SimCLRProjectionHead(cfg.hidden_size, cfg.hidden_size, 64)
        self.contrastive = NTXentLoss(temperature=temperature)
        self.contrastive_weight = contrastive_weight
        self.patch = cfg.patch_size

    def _reconstruction_loss(self, tokens: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return nn.functional.l1_loss(self.decoder(tokens), patchify(clean, self.patch))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = batch["image"]
        first, second = _apply(self.views, clean), _apply(self.views, clean)
        tokens_1, _ = self.backbone(first)
        tokens_2, _ = self.backbone(second)
        reconstruction = (self._reconstruction_loss(tokens_1, clean) + self._reconstruction_loss(tokens_2, clean)) / 2
        contrast = self.contrastive(self.head(tokens_1.mean(dim=1)), self.head(tokens_2.mean(dim=1)))
        return reconstruction + self.contrastive_weight * contrast


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 1, S, S, S] -> [B, n_patches, patch**3], patches in the order of MONAI's conv embedding."""
    b, c, d, h, w = images.shape
    x = images.reshape(b, c, d // patch, patch, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, patch ** 3 * c)


class MaskedAutoencoder3D(_VolumeMethod):
    """MONAI's MaskedAutoEncoderViT (He et al., "Masked Autoencoders Are Scalable Vision
    Learners", CVPR 2022, in 3D): mean squared error on the masked patches only, each
    patch normalised by its own mean and variance. The decoder width must divide by 6 (3D sin-cos
    position embedding) and by its 4 heads."""

    def __init__(self, cfg: VolumeModelConfig, masking_ratio: float = 0.75, decoder_hidden_size: int = 48,
                 decoder_layers: int = 1, norm_pixel_loss: bool = True) -> None:
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        self.mae = MaskedAutoEncoderViT(in_channels=1, img_size=cfg.size, patch_size=cfg.patch_size,
                                        hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers,
                                        num_heads=cfg.num_heads, masking_ratio=masking_ratio,
                                        decoder_hidden_size=decoder_hidden_size, decoder_mlp_dim=2 * decoder_hidden_size,
                                        decoder_num_layers=decoder_layers, decoder_num_heads=4,
                                        pos_embed_type="learnable", spatial_dims=3)
        self.backbone = build_backbone(cfg)
        # one set of encoder weights: the MAE's patch embedding and blocks are the backbone's
        self.mae.patch_embedding = self.backbone.patch_embedding
        self.mae.blocks = nn.Sequential(*self.backbone.blocks, self.backbone.norm)
        self.patch = cfg.patch_size
        self.norm_pixel_loss = norm_pixel_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"]
        # MONAI's forward writes float tokens into bf16 ones under autocast: run it in fp32
        with torch.autocast(images.device.type, enabled=False):
            predicted, mask = self.mae(images.float())
        target = patchify(images, self.patch)
        if self.norm_pixel_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((predicted - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


class SimCLR3D(_VolumeMethod):
    """SimCLR (Chen et al., ICML 2020) on pooled 3D embeddings of any backbone: two augmented
    views, lightly's projection head and NT-Xent loss."""

    def __init__(self, cfg: VolumeModelConfig, temperature: float = 0.2, projection_dim: int = 64) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg)
        dim = feature_dim(cfg)
        self.head = SimCLRProjectionHead(dim, dim, projection_dim)
        self.views = contrastive_views(cfg.size)
        self.loss = NTXentLoss(temperature=temperature)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"]
        z1 = self.head(pooled_features(self.backbone, _apply(self.views, images)))
        z2 = self.head(pooled_features(self.backbone, _apply(self.views, images)))
        return self.loss(z1, z2)
