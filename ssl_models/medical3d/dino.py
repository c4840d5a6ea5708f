"""DINO on sub-volumes (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, in 3D): a student matches a momentum teacher's centred, sharpened prototype scores
across two global and several local sub-volumes of each volume (MONAI's crop, resize, flip and
intensity transforms), on the pooled embedding of any backbone. With `ibot_weight > 0` and
`model.backbone: vit`, iBOT's masked-patch term on MONAI's ViT tokens too. The shared logic
(teacher, schedules, world-size invariant centring) is `ssl_models.core.dino`.

Registered in config.py: `METHODS.register_lazy("dino", ...:DINO3D, options=...:DINOOptions)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssl_models.core.dino import DINOOptions, SelfDistillation
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, generator
from ssl_models.medical3d.backbones import VolumeEncoder
from ssl_models.medical3d.methods import _VolumeMethod, freeze_unused_norms
from ssl_models.medical3d.views import crop_then_jitter, images_of

__all__ = ["DINO3D", "DINOOptions", "MultiCropSubvolumes", "subvolume_views"]

LOCAL_STREAM = 0x10CA1  # a volume's local crops draw from its seed xor this: a stream of their own


def subvolume_views(side: int, scale: Sequence[float]):
    """A random box covering a volume share in `scale` (each side drawn between the cube roots,
    per axis), resized to a `side`-voxel cube, then flips and intensity scale, shift and noise."""
    from monai.transforms import RandScaleCrop

    low, high = (share ** (1 / 3) for share in scale)
    return crop_then_jitter(RandScaleCrop(roi_scale=low, max_roi_scale=high, random_size=True), side)


@dataclass
class MultiCropSubvolumes(DataSide):
    """`global_crops` [B, 2, 1, S, S, S] and `local_crops` [B, L, 1, s, s, s] (absent for L = 0) per
    volume, from MONAI recipes reseeded with the volume's seed (the local ones with a stream of their
    own); with `patches`, iBOT's `masks` [B, 2, patches] (True: masked), as many in every crop."""

    global_views: Any  # MONAI Compose of array transforms on [1, S, S, S]
    local_views: Any
    local_crops: int
    patches: int = 0
    mask_ratio: float = 0.0

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        from monai.utils import convert_to_tensor

        def draw(views: Any, image: torch.Tensor, count: int) -> torch.Tensor:
            return torch.stack([convert_to_tensor(views(image.clone()), dtype=torch.float32, track_meta=False)
                                for _ in range(count)])

        global_crops, local_crops = [], []
        for image, seed in zip(images_of(rows), seeds):
            self.global_views.set_random_state(seed=seed % 2**32)
            global_crops.append(draw(self.global_views, image, 2))
            if self.local_crops:
                self.local_views.set_random_state(seed=(seed ^ LOCAL_STREAM) % 2**32)
                local_crops.append(draw(self.local_views, image, self.local_crops))
        out = {"global_crops": torch.stack(global_crops)}
        if self.local_crops:
            out["local_crops"] = torch.stack(local_crops)
        if self.patches:
            noise = torch.stack([torch.rand(2, self.patches, generator=generator(seed)) for seed in seeds])
            masked = noise.argsort(dim=-1, stable=True)[..., :max(1, int(self.patches * self.mask_ratio))]
            out["masks"] = torch.zeros(noise.shape, dtype=torch.bool).scatter_(2, masked, True)
        return out


class DINO3D(SelfDistillation, _VolumeMethod):
    """Student and EMA teacher on the pooled embedding of any 3D backbone; lightly's DINO head and
    loss. The 3D ResNet takes local sub-volumes at `crops.local_size` of the cube's side; MONAI's
    ViT (position embeddings of one grid) at the cube's."""

    def __init__(self, encoder: VolumeEncoder, options: DINOOptions) -> None:
        super().__init__(encoder, options)
        self.is_vit = encoder.cfg.backbone == "vit"
        if options.ibot_weight > 0 and not self.is_vit:
            raise PipelineError("pretrain.options.ibot_weight > 0 (iBOT's masked patches) needs model.backbone: vit")
        self.setup_distillation(encoder.dim, options)
        freeze_unused_norms(self)

    def data_side(self) -> DataSide:
        size, crops = self.encoder().cfg.size, self.options.crops
        local_side = size if self.is_vit else max(1, round(size * crops.local_size))
        patches = self.encoder().backbone.patch_embedding.n_patches if self.options.ibot_weight > 0 else 0
        return MultiCropSubvolumes(subvolume_views(size, crops.global_scale),
                                   subvolume_views(local_side, crops.local_scale), crops.local_crops, patches,
                                   self.options.ibot_mask_ratio)

    def features(self, network: str, images: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        backbone = self.encoder().backbone if network == "student" else self.teacher_backbone
        if self.options.ibot_weight == 0:
            out = backbone(images)
            return (out[0].mean(dim=1) if isinstance(out, tuple) else out), None  # as VolumeEncoder pools
        # MONAI's ViT forward (no class token: classification off) with masked patches replaced by
        # the mask token at their position
        tokens = backbone.patch_embedding(images)
        if mask is not None:
            masked = self.mask_token + backbone.patch_embedding.position_embeddings
            tokens = torch.where(mask.unsqueeze(-1), masked.to(tokens.dtype), tokens)
        for block in backbone.blocks:
            tokens = block(tokens)
        tokens = backbone.norm(tokens)
        return tokens.mean(dim=1), tokens
