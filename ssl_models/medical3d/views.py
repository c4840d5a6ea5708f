"""The data side of the 3D methods: shard rows decoded into cubes, MONAI's view recipes
applied per volume, and MAE patch masks. Every draw of volume i comes from `seeds[i]`:
a view recipe is reseeded with it (`set_random_state`), a mask drawn from a generator of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssl_models.core.modules import DataSide, generator


def stored_images(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Rows of a shard (float16 bytes + shape) -> their float16 batch [B, 1, S, S, S], as stored."""
    return torch.from_numpy(np.stack([np.frombuffer(row["image"], dtype=np.float16).reshape(row["shape"])
                                      for row in rows]))[:, None]


def images_of(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Rows of a shard -> a float32 batch [B, 1, S, S, S] (torch's float16 -> float32 is ~7x numpy's)."""
    return stored_images(rows).float()


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


def crop_then_jitter(crop, side: int):
    """`crop` (a MONAI crop transform), resized to a `side`-voxel cube, then flips, intensity scale and
    shift, and noise: the 3D two-view recipe (SimCLR's) and DINO's crops share all but the crop."""
    from monai.transforms import Compose, RandFlip, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity, Resize

    return Compose([
        crop,
        Resize(spatial_size=(side, side, side), mode="trilinear"),
        RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1), RandFlip(prob=0.5, spatial_axis=2),
        RandScaleIntensity(factors=0.2, prob=0.8), RandShiftIntensity(offsets=0.1, prob=0.8),
        RandGaussianNoise(prob=0.5, std=0.05),
    ])


def contrastive_views(size: int):
    """Crop-and-resize, flips, intensity scale/shift and noise: SimCLR's recipe in 3D."""
    from monai.transforms import RandSpatialCrop

    return crop_then_jitter(RandSpatialCrop(roi_size=int(size * 0.6), max_roi_size=size, random_size=True), size)


@dataclass
class TwoViews(DataSide):
    """`image` (the clean cubes) and `view_1`, `view_2`: two draws of the MONAI recipe `views`
    per volume, in that order, from one random state seeded with the volume's seed."""

    views: Any  # a MONAI Compose of array transforms on [1, S, S, S]

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        from monai.utils import convert_to_tensor

        clean = images_of(rows)
        first, second = [], []
        for image, seed in zip(clean, seeds):
            self.views.set_random_state(seed=seed % 2**32)
            for out in (first, second):  # a clone each: no view sees another's dropped voxels
                out.append(convert_to_tensor(self.views(image.clone()), dtype=torch.float32, track_meta=False))
        return {"image": clean, "view_1": torch.stack(first), "view_2": torch.stack(second)}


@dataclass
class MaskedPatches(DataSide):
    """`image` (float16, as stored: half the bytes to hand over and to copy to a GPU; the method
    widens it, exactly) and `kept` [B, n_kept]: the patches the MAE encoder sees, a random subset
    of the same size for every volume (MONAI keeps `int((1 - masking_ratio) * n_patches)`)."""

    n_patches: int
    n_kept: int

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        kept = [torch.randperm(self.n_patches, generator=generator(seed))[:self.n_kept] for seed in seeds]
        return {"image": stored_images(rows), "kept": torch.stack(kept).sort(dim=1).values}
