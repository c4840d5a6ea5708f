"""Self-supervised methods for tiles, each a `PretrainMethod(encoder, options)` with
`forward(batch) -> loss`; their views and masks are built by the data sides in `views.py`.
Losses and heads come from lightly. With several processes (DDP) the world size changes nothing
but speed: NT-Xent, DCL and VICReg gather the whole global batch (`gather_distributed`); BYOL's
loss and MAE's (a fixed number of masked patches per tile) are means of per-sample terms. The
heads' BatchNorm is synchronised on GPUs only (`head_batch_norm: false` where a CPU run must not
depend on the split), as is the ResNet backbone's.

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
from ssl_models.core.modules import DataSide, PretrainMethod
from ssl_models.histopathology.views import MaskedView, TwoViews
from ssl_models.histopathology.backbones import TileEncoder, decode_tiles, normalise
from ssl_models.histopathology.config import BYOLOptions, MAEOptions, SimCLROptions, VICRegOptions


def two_layer_head(dims: tuple[int, int, int], batch_norm: bool) -> nn.Module:
    """lightly's Linear-BatchNorm-ReLU-Linear head (BYOL's projection and prediction heads,
    VICReg's with two layers), the BatchNorm left out when `batch_norm` is false."""
    from lightly.models.modules.heads import ProjectionHead

    d_in, hidden, d_out = dims
    return ProjectionHead([(d_in, hidden, nn.BatchNorm1d(hidden) if batch_norm else None, nn.ReLU()),
                           (hidden, d_out, None, None)])


class TileMethod(PretrainMethod):
    """Shared plumbing: rows hold raw tiles (`pixels`); the encoder's `backbone` maps images to
    features (pretraining uses them without the encoder's layer norm)."""

    backbone_encoder: TileEncoder

    @property
    def backbone(self) -> nn.Module:
        return self.backbone_encoder.backbone

    def data_side(self) -> DataSide:
        return TwoViews(self.options.augment)

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return self.backbone(normalise(decode_tiles([s["pixels"] for s in samples])))


class SimCLR(TileMethod):
    """SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020): two views of a tile attract, the other tiles of the batch
    repel. `loss: dcl` uses the decoupled contrastive loss (Yeh et al., ECCV 2022), which drops
    the positive from the denominator and works better with small batches, as on a CPU.

    Usage: `method = SimCLR(encoder, SimCLROptions()); loss = method(method.data_side()(rows, seeds))`.
    """

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder: TileEncoder, options: SimCLROptions) -> None:
        super().__init__(encoder, options)
        from lightly.loss import DCLLoss, NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.head = SimCLRProjectionHead(encoder.dim, encoder.dim, options.projection_dim,
                                         batch_norm=options.head_batch_norm)
        loss = NTXentLoss if options.loss == "ntxent" else DCLLoss
        self.criterion = loss(temperature=options.temperature, gather_distributed=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(self.head(self.backbone(batch["first"])), self.head(self.backbone(batch["second"])))


class VICReg(TileMethod):
    """VICReg (Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", ICLR 2022): no negatives; the variance and covariance terms keep
    the embedding from collapsing."""

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder: TileEncoder, options: VICRegOptions) -> None:
        super().__init__(encoder, options)
        from lightly.loss import VICRegLoss

        self.head = two_layer_head((encoder.dim, 2 * encoder.dim, options.projection_dim), options.head_batch_norm)
        self.criterion = VICRegLoss(gather_distributed=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(self.head(self.backbone(batch["first"])), self.head(self.backbone(batch["second"])))


class BYOL(TileMethod):
    """BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): an online network
    predicts a momentum (EMA) teacher's projection of the other view. The teacher is a buffer-
    like copy updated in `forward`, so checkpoints hold it and a resumed run continues exactly.
    Under DDP every process updates its teacher from the same (gradient-averaged) online
    weights, so the teachers stay identical without any communication."""

    checkpoint_rule = "rankme"  # joint-embedding: RankMe ranks its checkpoints

    def __init__(self, encoder: TileEncoder, options: BYOLOptions) -> None:
        super().__init__(encoder, options)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.utils import deactivate_requires_grad

        dim, projection_dim = encoder.dim, options.projection_dim
        self.projection = two_layer_head((dim, 2 * dim, projection_dim), options.head_batch_norm)
        self.prediction = two_layer_head((projection_dim, 2 * dim, projection_dim), options.head_batch_norm)
        self.teacher_backbone = copy.deepcopy(encoder.backbone)
        self.teacher_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_projection)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        if self.training:
            update_momentum(self.backbone, self.teacher_backbone, self.options.momentum)
            update_momentum(self.projection, self.teacher_projection, self.options.momentum)
        views = (batch["first"], batch["second"])
        online = [self.prediction(self.projection(self.backbone(v))) for v in views]
        with torch.no_grad():
            target = [self.teacher_projection(self.teacher_backbone(v)) for v in views]
        return 0.5 * (self.criterion(online[0], target[1]) + self.criterion(online[1], target[0]))


class MAE(TileMethod):
    """Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners",
    CVPR 2022): the ViT sees a random quarter of the patches (`idx_keep`, drawn by the data
    side) and a small decoder rebuilds the pixels of the rest (per-patch normalised targets).
    Needs `model.backbone: vit`."""

    def __init__(self, encoder: TileEncoder, options: MAEOptions) -> None:
        super().__init__(encoder, options)
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        vit = encoder.backbone
        if not isinstance(vit, VisionTransformer):
            raise PipelineError("pretrain.method mae needs model.backbone: vit")
        self.patch_size = vit.patch_embed.patch_size[0]
        # lightly initialises the ViT's weights and sincos position embeddings again unless told to skip:
        # a continued pretraining must start from model.base_checkpoint's, not from new ones
        keep = "skip" if encoder.cfg.base_checkpoint else ""
        self.masked_vit = MaskedVisionTransformerTIMM(vit=vit, weight_initialization=keep,
                                                      pos_embed_initialization="skip" if keep == "skip" else "sincos")
        self.decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size,
                                      embed_dim=vit.embed_dim, decoder_embed_dim=options.decoder_dim,
                                      decoder_depth=options.decoder_depth, decoder_num_heads=options.decoder_heads,
                                      num_prefix_tokens=vit.num_prefix_tokens)
        # never on MAE's path (the pooled features' norm; a mask token for masked-token input):
        # frozen, as DDP needs every trainable parameter in the loss (they never moved anyway)
        vit.fc_norm.requires_grad_(False)
        self.masked_vit.mask_token.requires_grad_(False)

    def data_side(self) -> DataSide:
        vit = self.backbone
        return MaskedView(self.options.augment, vit.patch_embed.num_patches, vit.num_prefix_tokens,
                          self.options.mask_ratio)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lightly.models import utils

        images, idx_keep, idx_mask = batch["images"], batch["idx_keep"], batch["idx_mask"]
        encoded = self.masked_vit.encode(images=images, idx_keep=idx_keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (images.shape[0], self.masked_vit.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, self.decoder.embed(encoded))
        predicted = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - self.backbone.num_prefix_tokens)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return nn.functional.mse_loss(predicted, target)  # the same number of masked patches in every tile
