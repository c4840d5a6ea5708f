"""Preprocessing as MONAI dictionary transforms: resample to a target spacing, normalise
intensities by modality, crop to the foreground, resize (aspect kept) and pad to a cube."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_models.medical3d.config import VolumePreprocessConfig


def build_preprocess(cfg: VolumePreprocessConfig, size: int, modality: str):
    """The deterministic chain for one modality; input {"image": MetaTensor [1, x, y, z]}."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        NormalizeIntensityd,
        Resized,
        ResizeWithPadOrCropd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    steps: list[Any] = []
    if cfg.spacing is not None:
        steps.append(Spacingd(keys="image", pixdim=cfg.spacing, mode="bilinear"))
    if modality == "ct":
        low, high = cfg.ct_window
        steps.append(ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif cfg.mr_normalisation == "zscore":
        steps.append(NormalizeIntensityd(keys="image", nonzero=True))
    else:
        low, high = cfg.mr_percentiles
        steps.append(ScaleIntensityRangePercentilesd(keys="image", lower=low, upper=high, b_min=0.0, b_max=1.0,
                                                     clip=True))
    if cfg.crop_foreground:
        threshold = cfg.foreground_threshold
        steps.append(CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > threshold,
                                     allow_smaller=True))
    steps += [Resized(keys="image", spatial_size=size, size_mode="longest", mode="area"),
              ResizeWithPadOrCropd(keys="image", spatial_size=(size, size, size))]
    return Compose(steps)


def preprocess_volume(array: np.ndarray, spacing: tuple[float, float, float], modality: str,
                      cfg: VolumePreprocessConfig, size: int) -> np.ndarray:
    """One RAS volume -> a float16 cube [size, size, size] ready for the model."""
    import torch
    from monai.data import MetaTensor

    finite = np.isfinite(array)
    if not finite.all():  # a few NaN voxels (outside the field of view) become the minimum
        array = np.where(finite, array, array[finite].min())
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
                       affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))
    cube = np.asarray(build_preprocess(cfg, size, modality)({"image": image})["image"][0])
    if modality == "ct" or cfg.mr_normalisation == "percentile":
        # when the low and high percentiles coincide (a cube that is mostly background) MONAI
        # only shifts the values; clipping keeps every volume in [0, 1]
        cube = np.clip(cube, 0.0, 1.0)
    return cube.astype(np.float16)
