"""Self-supervised methods for tiles, each a `PretrainMethod` with `forward(batch) -> loss`.
Losses and heads come from lightly (they gather across GPUs under DDP).

- `simclr`: contrastive, NT-Xent or decoupled contrastive (DCL) loss.
- `vicreg`: non-contrastive variance-invariance-covariance.
- `byol`: self-distillation with a momentum teacher.
- `mae`: masked image modelling on a ViT backbone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod
from ssl_models.histopathology.augment import pathology_view
from ssl_models.histopathology.backbones import decode_tiles, feature_dim, normalise
from ssl_models.histopathology.config import HISTO_METHODS, AugmentConfig


class TileMethod(PretrainMethod):
    """Shared plumbing: rows hold raw tiles (`pixels`); `backbone` maps images to features."""

    def __init__(self, backbone: nn.Module, augment: AugmentConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.augment = augment

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"images": decode_tiles([s["pixels"] for s in samples])}

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"]
        return normalise(pathology_view(images, self.augment)), normalise(pathology_view(images, self.augment))

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return self.backbone(normalise(self.collate(samples)["images"]))


@HISTO_METHODS.register("simclr")
class SimCLR(TileMethod):
    """SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020): two views of a tile attract, the other tiles of the batch
    repel. `loss: dcl` uses the decoupled contrastive loss (Yeh et al., ECCV 2022), which drops
    the positive from the denominator and works better with small batches, as on a CPU.

    Usage: `loss = SimCLR(backbone, AugmentConfig())(method.collate(rows))`.
    """

    def __init__(self, backbone: nn.Module, augment: AugmentConfig, loss: str = "ntxent",
                 temperature: float = 0.2, projection_dim: int = 64) -> None:
        super().__init__(backbone, augment)
        from lightly.loss import DCLLoss, NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        dim = feature_dim(backbone)
        self.head = SimCLRProjectionHead(dim, dim, projection_dim)
        if loss not in ("ntxent", "dcl"):
            raise PipelineError(f"simclr: loss {loss!r} is not ntxent or dcl")
        self.criterion = (NTXentLoss(temperature=temperature, gather_distributed=True) if loss == "ntxent"
                          else DCLLoss(temperature=temperature, gather_distributed=True))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        first, second = self.views(batch)
        return self.criterion(self.head(self.backbone(first)), self.head(self.backbone(second)))


@HISTO_METHODS.register("vicreg")
class VICReg(TileMethod):
    """VICReg (Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", ICLR 2022): no negatives; the variance and covariance terms keep
    the embedding from collapsing."""

    def __init__(self, backbone: nn.Module, augment: AugmentConfig, projection_dim: int = 128) -> None:
        super().__init__(backbone, augment)
        from lightly.loss import VICRegLoss
        from lightly.models.modules.heads import VICRegProjectionHead

        dim = feature_dim(backbone)
        self.head = VICRegProjectionHead(dim, 2 * dim, projection_dim, num_layers=2)
        self.criterion = VICRegLoss(gather_distributed=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        first, second = self.views(batch)
        return self.criterion(self.head(self.backbone(first)), self.head(self.backbone(second)))


@HISTO_METHODS.register("byol")
class BYOL(TileMethod):
    """BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): an online network
    predicts a momentum (EMA) teacher's projection of the other view. The teacher is a buffer-
    like copy updated in `forward`, so checkpoints hold it and a resumed run continues exactly."""

    def __init__(self, backbone: nn.Module, augment: AugmentConfig, momentum: float = 0.99,
                 projection_dim: int = 64) -> None:
        super().__init__(backbone, augment)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        dim = feature_dim(backbone)
        self.projection = BYOLProjectionHead(dim, 2 * dim, projection_dim)
        self.prediction = BYOLPredictionHead(projection_dim, 2 * dim, projection_dim)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_projection)
        self.momentum = momentum
        self.criterion = NegativeCosineSimilarity()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        if self.training:
            update_momentum(self.backbone, self.teacher_backbone, self.momentum)
            update_momentum(self.projection, self.teacher_projection, self.momentum)
        first, second = self.views(batch)
        online = [self.prediction(self.projection(self.backbone(v))) for v in (first, second)]
        with torch.no_grad():
            target = [self.teacher_projection(self.teacher_backbone(v)) for v in (first, second)]
        return 0.5 * (self.criterion(online[0], target[1]) + self.criterion(online[1], target[0]))


@HISTO_METHODS.register("mae")
class MAE(TileMethod):
    """Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners",
    CVPR 2022): the ViT sees a random quarter of the patches and a small decoder rebuilds the
    pixels of the rest (per-patch normalised targets). Needs `model.backbone: vit`; views are
    only rotated, flipped and stain-jittered."""

    def __init__(self, backbone: nn.Module, augment: AugmentConfig, mask_ratio: float = 0.75,
                 decoder_dim: int = 64, decoder_depth: int = 1, decoder_heads: int = 4) -> None:
        super().__init__(backbone, augment)
        from timm.models.vision_transformer import VisionTransformer
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        if not isinstance(backbone, VisionTransformer):
            raise PipelineError("pretrain.method mae needs model.backbone: vit")
        self.mask_ratio = mask_ratio
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.masked_vit = MaskedVisionTransformerTIMM(vit=backbone)
        self.sequence_length = self.masked_vit.sequence_length
        self.prefix_tokens = backbone.num_prefix_tokens
        self.decoder = MAEDecoderTIMM(num_patches=backbone.patch_embed.num_patches, patch_size=self.patch_size,
                                      embed_dim=backbone.embed_dim, decoder_embed_dim=decoder_dim,
                                      decoder_depth=decoder_depth, decoder_num_heads=decoder_heads,
                                      num_prefix_tokens=backbone.num_prefix_tokens)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lightly.models import utils

        images = normalise(pathology_view(batch["images"], AugmentConfig(
            hed_jitter=self.augment.hed_jitter, rotate90=self.augment.rotate90, flip=self.augment.flip,
            crop_scale=1.0, blur_probability=0.0)))
        n = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(n, self.sequence_length), mask_ratio=self.mask_ratio,
                                                     device=images.device)
        encoded = self.masked_vit.encode(images=images, idx_keep=idx_keep)
        decoder_input = self.decoder.embed(encoded)
        tokens = utils.repeat_token(self.decoder.mask_token, (n, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, decoder_input)
        decoded = self.decoder.decode(tokens)
        predicted = self.decoder.predict(utils.get_at_index(decoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - self.prefix_tokens)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return nn.functional.mse_loss(predicted, target)
