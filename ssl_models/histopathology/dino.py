"""DINO for tiles (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021), the self-distillation behind the field's strongest tile encoders (UNI, Virchow,
Phikon: DINOv2 / iBOT with multi-crop): a student matches a momentum teacher's centred, sharpened
prototype scores across two global and several local crops of each tile; the crops carry the
domain's pathology augmentations (stain jitter, quarter turns, flips, blur). With
`ibot_weight > 0` and `model.backbone: vit`, iBOT's masked-patch term too. The shared logic
(teacher, schedules, world-size invariant centring) is `ssl_models.core.dino`.

Registered in config.py: `METHODS.register_lazy("dino", ...:DINO, options=...:DINOOptions)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from ssl_models.core import dino as core_dino
from ssl_models.core.config import require
from ssl_models.core.dino import MultiCropOptions, SelfDistillation
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, generator
from ssl_models.histopathology.backbones import TileEncoder, decode_tiles, normalise
from ssl_models.histopathology.config import AugmentConfig
from ssl_models.histopathology.methods import TileMethod
from ssl_models.histopathology.views import VIEW_DRAWS, pathology_view, random_resized_crop


@dataclass
class DINOOptions(core_dino.DINOOptions):
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # its crop_scale is replaced by `crops`

    def validate(self, where: str) -> None:
        super().validate(where)
        require(not self.augment.batch_styles_standardization, f"{where}.augment.batch_styles_standardization",
                "dino's crops take no batch-level style swap: set it to false")


def crop_view(images: torch.Tensor, draws: torch.Tensor, scale: Sequence[float], side: int,
              augment: AugmentConfig) -> torch.Tensor:
    """One crop of each image covering an area share in `scale` (its draws 0-2), with the pathology
    augmentations of `augment` (draws 3-11; its own crop off), resized to `side` pixels."""
    low, high = scale
    crop_side = torch.sqrt(low + draws[:, 0] * (high - low))
    view = random_resized_crop(images, crop_side, (draws[:, 1:3] * 2 - 1) * (1 - crop_side).unsqueeze(1))
    view = pathology_view(view, draws, augment)
    if side != view.shape[-1]:  # per image: a slice of the batch is still the batch of the slice
        view = F.interpolate(view, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return view


@dataclass
class MultiCropViews(DataSide):
    """`global_crops` [B, 2, 3, s, s] and `local_crops` [B, L, 3, local_side, local_side] of each
    tile, normalised; with `patches`, iBOT's `masks` [B, 2, patches] (True: masked), the same number
    of patches in every crop. Draws per tile from its seed: one row of `VIEW_DRAWS` uniforms per
    crop (globals first), then the masks' noise."""

    augment: AugmentConfig
    crops: MultiCropOptions
    local_side: int
    patches: int = 0  # iBOT: patches of a global crop (0: no masks)
    mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.augment = replace(self.augment, crop_scale=1.0, batch_styles_standardization=False)

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        images = decode_tiles([row["pixels"] for row in rows])
        n_local, size = self.crops.local_crops, images.shape[-1]
        generators = [generator(seed) for seed in seeds]
        draws = torch.stack([torch.rand(2 + n_local, VIEW_DRAWS, generator=g) for g in generators])
        out = {"global_crops": normalise(torch.stack(
            [crop_view(images, draws[:, v], self.crops.global_scale, size, self.augment) for v in range(2)], dim=1))}
        if n_local:
            out["local_crops"] = normalise(torch.stack(
                [crop_view(images, draws[:, 2 + v], self.crops.local_scale, self.local_side, self.augment)
                 for v in range(n_local)], dim=1))
        if self.patches:
            noise = torch.stack([torch.rand(2, self.patches, generator=g) for g in generators])
            masked = noise.argsort(dim=-1, stable=True)[..., :max(1, int(self.patches * self.mask_ratio))]
            out["masks"] = torch.zeros(noise.shape, dtype=torch.bool).scatter_(2, masked, True)
        return out


class DINO(SelfDistillation, TileMethod):
    """Student and EMA teacher on any tile backbone; lightly's DINO head and loss. A ResNet takes
    local crops at `crops.local_size` of the tile's side; the ViT (one input size) at the tile's."""

    def __init__(self, encoder: TileEncoder, options: DINOOptions) -> None:
        super().__init__(encoder, options)
        from timm.models.vision_transformer import VisionTransformer

        self.is_vit = isinstance(encoder.backbone, VisionTransformer)
        if options.ibot_weight > 0 and not self.is_vit:
            raise PipelineError("pretrain.options.ibot_weight > 0 (iBOT's masked patches) needs model.backbone: vit")
        self.setup_distillation(encoder.dim, options)

    def data_side(self) -> DataSide:
        size, options = self.encoder().image_size, self.options
        local_side = size if self.is_vit else max(1, round(size * options.crops.local_size))
        patches = self.backbone.patch_embed.num_patches if options.ibot_weight > 0 else 0
        return MultiCropViews(options.augment, options.crops, local_side, patches, options.ibot_mask_ratio)

    def features(self, network: str, images: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        backbone = self.backbone if network == "student" else self.teacher_backbone
        if self.options.ibot_weight == 0:
            return backbone(images), None
        from lightly.models.modules import MaskedVisionTransformerTIMM

        # lightly's masked-token path through the timm ViT, built per call around the current modules
        # (nothing of its own to save or shard); the class token is never masked
        masked_vit = MaskedVisionTransformerTIMM(vit=backbone, mask_token=self.mask_token, weight_initialization="skip",
                                                 pos_embed_initialization="skip")
        if mask is not None:
            mask = F.pad(mask, (backbone.num_prefix_tokens, 0), value=False)
        tokens = masked_vit.encode(images, mask=mask)
        # pooled as the ViT pools (mean of the patch tokens, fc_norm); each patch token through that norm too
        return backbone.forward_head(tokens, pre_logits=True), backbone.fc_norm(tokens[:, backbone.num_prefix_tokens:])
