"""Self-supervised objectives for 3D volumes, one `nn.Module` each around a `VolumeEncoder`:
`forward(batch) -> loss`. Views and masks arrive in the batch, drawn by the method's data side
(`views.py`) from per-sample seeds; nothing random is left in a forward pass.

With several processes (DDP) the world size changes nothing but speed: NT-Xent gathers the
whole global batch (`gather_distributed`), the reconstruction losses are means over a fixed
number of patches per volume (the MAE's through `global_mean` over its masked patches). The
projection heads' BatchNorm, and the 3D ResNet's, are synchronised on GPUs only
(`head_batch_norm: false` and the ViT where a CPU run must not depend on the split).
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

from ssl_models.core.distributed import global_mean
from ssl_models.core.modules import DataSide, PretrainMethod
from ssl_models.medical3d.config import InpaintingContrastiveOptions, MaeOptions, SimCLROptions
from ssl_models.medical3d.backbones import VolumeEncoder
from ssl_models.medical3d.views import MaskedPatches, TwoViews, contrastive_views, inpainting_views


def freeze_unused_norms(module: nn.Module) -> None:
    """MONAI's transformer blocks build a `norm_cross_attn` even without cross-attention; it never
    takes part in a loss, and DDP needs every trainable parameter to: frozen (it never moved anyway)."""
    from monai.networks.blocks.transformerblock import TransformerBlock

    for block in module.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)


class _VolumeMethod(PretrainMethod):
    backbone_encoder: VolumeEncoder

    @torch.no_grad()
    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        encoder = self.encoder()
        return encoder(encoder.collate(samples))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 1, S, S, S] -> [B, n_patches, patch**3], patches in the order of MONAI's conv embedding."""
    b, c, d, h, w = images.shape
    x = images.reshape(b, c, d // patch, patch, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, patch ** 3 * c)


class InpaintingContrastive(_VolumeMethod):
    """MONAI's ViT auto-encoder recipe: reconstruct the clean volume from two corrupted views
    (L1), plus NT-Xent between the views' pooled embeddings (lightly's loss, which gathers
    across GPUs, in place of MONAI's ContrastiveLoss). The decoder maps each token to its
    patch's voxels: MONAI's ViTAutoEnc decoder (transposed convolutions) needs a square
    patch size (4, 16), which would force 512 or 8 tokens on a 32-voxel cube."""

    def __init__(self, encoder: VolumeEncoder, options: InpaintingContrastiveOptions) -> None:
        super().__init__(encoder, options)
        cfg = encoder.cfg
        self.decoder = nn.Linear(cfg.hidden_size, cfg.patch_size ** 3)
        self.head = SimCLRProjectionHead(cfg.hidden_size, cfg.hidden_size, 64, batch_norm=options.head_batch_norm)
        self.contrastive = NTXentLoss(temperature=options.temperature, gather_distributed=True)
        freeze_unused_norms(self)

    def data_side(self) -> DataSide:
        return TwoViews(inpainting_views(self.encoder().cfg.size))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean, vit = patchify(batch["image"], self.encoder().cfg.patch_size), self.encoder().backbone
        tokens_1, _ = vit(batch["view_1"])
        tokens_2, _ = vit(batch["view_2"])
        reconstruction = (nn.functional.l1_loss(self.decoder(tokens_1), clean)
                          + nn.functional.l1_loss(self.decoder(tokens_2), clean)) / 2
        contrast = self.contrastive(self.head(tokens_1.mean(dim=1)), self.head(tokens_2.mean(dim=1)))
        return reconstruction + self.options.contrastive_weight * contrast


class _GivenMaskMAE(MaskedAutoEncoderViT):
    """MONAI's MaskedAutoEncoderViT with the kept patches given (`forward(x, kept)`) instead of
    drawn by `torch.multinomial` on the global RNG: its `_masking`, on the given indices."""

    def forward(self, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore
        self._kept = kept.cpu()  # MONAI's indices live on the CPU, whatever the device
        try:
            return super().forward(x)
        finally:
            del self._kept

    def _masking(self, x: torch.Tensor, masking_ratio: float | None = None):
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        mask = torch.ones(x.shape[0], x.shape[1], dtype=torch.int)
        mask[rows, self._kept] = 0
        return x[rows, self._kept], self._kept, mask.to(x.device)


class MaskedAutoencoder3D(_VolumeMethod):
    """MONAI's MaskedAutoEncoderViT (He et al., "Masked Autoencoders Are Scalable Vision
    Learners", CVPR 2022, in 3D) sharing the ViT backbone's patch embedding and blocks: mean
    squared error on the masked patches only, each patch normalised by its own mean and
    variance when `norm_pixel_loss`. The kept patches come from the data side."""

    def __init__(self, encoder: VolumeEncoder, options: MaeOptions) -> None:
        super().__init__(encoder, options)
        cfg, vit = encoder.cfg, encoder.backbone
        self.mae = _GivenMaskMAE(in_channels=1, img_size=cfg.size, patch_size=cfg.patch_size,
                                 hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, masking_ratio=options.masking_ratio,
                                 decoder_hidden_size=options.decoder_hidden_size,
                                 decoder_mlp_dim=2 * options.decoder_hidden_size,
                                 decoder_num_layers=options.decoder_layers, decoder_num_heads=4,
                                 pos_embed_type="learnable", spatial_dims=3)
        # one set of encoder weights: the MAE's patch embedding and blocks are the backbone's
        self.mae.patch_embedding = vit.patch_embedding
        self.mae.blocks = nn.Sequential(*vit.blocks, vit.norm)
        freeze_unused_norms(self)

    def data_side(self) -> DataSide:
        n_patches = self.mae.patch_embedding.n_patches
        return MaskedPatches(n_patches, int((1 - self.options.masking_ratio) * n_patches))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"].float()  # the data side's float16 cubes, widened exactly
        # MONAI's forward writes float tokens into bf16 ones under autocast: run it in fp32
        with torch.autocast(images.device.type, enabled=False):
            predicted, mask = self.mae(images, batch["kept"])
        target = patchify(images, self.encoder().cfg.patch_size)
        if self.options.norm_pixel_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((predicted - target) ** 2).mean(dim=-1)
        return global_mean((per_patch * mask).sum(), mask.sum())


class SimCLR3D(_VolumeMethod):
    """SimCLR (Chen et al., ICML 2020) on pooled 3D embeddings of any backbone: two augmented
    views, lightly's projection head and NT-Xent loss."""

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder: VolumeEncoder, options: SimCLROptions) -> None:
        super().__init__(encoder, options)
        self.head = SimCLRProjectionHead(encoder.dim, encoder.dim, options.projection_dim,
                                         batch_norm=options.head_batch_norm)
        self.loss = NTXentLoss(temperature=options.temperature, gather_distributed=True)
        freeze_unused_norms(self)

    def data_side(self) -> DataSide:
        return TwoViews(contrastive_views(self.encoder().cfg.size))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        encoder = self.encoder()
        z1 = self.head(encoder({"image": batch["view_1"]}))
        z2 = self.head(encoder({"image": batch["view_2"]}))
        return self.loss(z1, z2)
