"""Pathology views of tiles (float [n, 3, s, s] in [0, 1]) and the methods' data sides, which
turn raw pretraining rows into views (and MAE's token masks) before the forward pass.

Every random number of sample i comes from `generator(seeds[i])`, drawn up front in a fixed
order (one row of uniforms per view, then MAE's token noise), and the operations are batched
over those per-sample parameters with per-pixel arithmetic only (no matmul or conv whose
kernel could change with the batch size), so a slice of the batch is the batch of the slice,
bit for bit. Batch styles standardization (BSS) is the exception: it mixes the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ssl_models.core.modules import DataSide, generator
from ssl_models.histopathology.backbones import decode_tiles, normalise
from ssl_models.histopathology.config import AugmentConfig

# Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution", 2001:
# optical density = concentrations @ STAIN_OD, rows hematoxylin, eosin, DAB (skimage.color's
# rgb_from_hed).
STAIN_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
OD_TO_CONCENTRATIONS = torch.linalg.inv(STAIN_OD)
# uniforms per view: crop side, crop centre (x, y), quarter turns, flip, stain scale (H, E, D),
# stain shift (H, E, D), blur
VIEW_DRAWS = 12
BSS_STREAM = 0x5EED_B55  # the batch's style draws: the first seed's value xor this, a stream of their own


def _mix(channels: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[n, 3, s, s] channels times a 3x3 matrix (out_j = sum_i x_i m_ij), per pixel."""
    rows = matrix.view(3, 1, 3, 1, 1)
    return channels[:, 0:1] * rows[0] + channels[:, 1:2] * rows[1] + channels[:, 2:3] * rows[2]


def hed_jitter(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Scale and shift each stain's concentration per image ([n, 3] each) (Tellez et al.,
    "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference", IEEE TMI 2018)."""
    od = -torch.log(images.clamp(min=1e-3, max=1.0))
    concentrations = _mix(od, OD_TO_CONCENTRATIONS)
    od = _mix(concentrations * scale[:, :, None, None] + shift[:, :, None, None], STAIN_OD)
    return torch.exp(-od).clamp(0, 1)


def rotate_flip(images: torch.Tensor, turns: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
    """Per image, `turns` multiples of 90 degrees, then a horizontal flip where `flip`: tissue has no up or left."""
    out = images
    if turns is not None:
        out = images.clone()
        for k in range(1, 4):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    if flip is not None:
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


def random_resized_crop(images: torch.Tensor, side: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """A square crop per image (`side`: its share of the width, `centre` in [-1, 1]^2), resized
    back by bilinear sampling; the sampling grid is built per pixel, not by affine_grid's matmul."""
    n, size = images.shape[0], images.shape[-1]
    pixel_centres = (torch.arange(size, dtype=images.dtype) * 2 + 1) / size - 1  # align_corners=False
    along = pixel_centres.view(1, 1, size) * side.view(n, 1, 1)
    grid = torch.stack([(along + centre[:, 0].view(n, 1, 1)).expand(n, size, size),
                        (along.transpose(1, 2) + centre[:, 1].view(n, 1, 1)).expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(images: torch.Tensor, chosen: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mild separable blur of the `chosen` images (focus varies across a scan)."""
    if sigma <= 0 or not chosen.any():
        return images
    radius, size = max(1, int(2 * sigma)), images.shape[-1]
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).tolist()
    padded = F.pad(images[chosen], (radius,) * 4, mode="reflect")
    rows = sum(w * padded[..., i:i + size] for i, w in enumerate(kernel))
    out = images.clone()
    out[chosen] = sum(w * rows[..., i:i + size, :] for i, w in enumerate(kernel))
    return out


def batch_styles_standardization(images: torch.Tensor, style: int, low_frequency: float) -> torch.Tensor:
    """Give every image of the batch the low-frequency Fourier amplitude (the "style": stain
    and scanner colour) of image `style` of it, keeping each image's phase (content).
    Scalbert et al., "Towards domain-invariant self-supervised learning with batch styles
    standardization", ICLR 2024; the amplitude swap of FDA (Yang & Soatto 2020)."""
    spectrum = torch.fft.fft2(images)
    amplitude, phase = spectrum.abs(), spectrum.angle()
    size = images.shape[-1]
    band = max(1, int(low_frequency * size / 2))
    low = torch.zeros(size, dtype=torch.bool)
    low[:band] = low[size - band:] = True  # the low frequencies sit in the corners of an unshifted FFT
    mask = low[:, None] & low[None, :]
    amplitude = torch.where(mask, amplitude[style].expand_as(amplitude), amplitude)
    return torch.fft.ifft2(torch.polar(amplitude, phase)).real.clamp(0, 1)


def pathology_view(images: torch.Tensor, draws: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """One augmented view of each image from its row of `VIEW_DRAWS` uniforms in [0, 1)."""
    view = images
    if cfg.crop_scale < 1:
        side = torch.sqrt(cfg.crop_scale + draws[:, 0] * (1 - cfg.crop_scale))
        view = random_resized_crop(view, side, (draws[:, 1:3] * 2 - 1) * (1 - side).unsqueeze(1))
    view = rotate_flip(view, (draws[:, 3] * 4).long().clamp(max=3) if cfg.rotate90 else None,
                       draws[:, 4] < 0.5 if cfg.flip else None)
    if cfg.hed_jitter > 0:
        view = hed_jitter(view, 1 + (draws[:, 5:8] * 2 - 1) * cfg.hed_jitter, (draws[:, 8:11] * 2 - 1) * cfg.hed_jitter)
    return gaussian_blur(view, draws[:, 11] < cfg.blur_probability, cfg.blur_sigma)


@dataclass
class TwoViews(DataSide):
    """Two augmented views of each tile, `first` and `second`, normalised (SimCLR, VICReg, BYOL).

    With BSS on, each view of the batch takes the style of one of its images, chosen from the
    batch's first seed: a batch-level draw, exempt from the slice property."""

    augment: AugmentConfig

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        images = decode_tiles([row["pixels"] for row in rows])
        draws = torch.stack([torch.rand(2, VIEW_DRAWS, generator=generator(seed)) for seed in seeds])
        views = [pathology_view(images, draws[:, v], self.augment) for v in range(2)]
        if self.augment.batch_styles_standardization:
            styles = torch.randint(0, len(rows), (2,), generator=generator(seeds[0] ^ BSS_STREAM)).tolist()
            views = [batch_styles_standardization(view, style, self.augment.bss_low_frequency)
                     for view, style in zip(views, styles)]
        return {"first": normalise(views[0]), "second": normalise(views[1])}


@dataclass
class MaskedView(DataSide):
    """One view per tile (rotation, flip and stain jitter only: the decoder rebuilds the tile
    itself) and a random token mask per tile, as lightly's `random_token_mask`: `idx_keep`
    (prefix tokens first, then a random `1 - mask_ratio` of the patches) and `idx_mask`."""

    augment: AugmentConfig
    patches: int
    prefix_tokens: int  # the class token: never masked
    mask_ratio: float

    def __post_init__(self) -> None:
        self.augment = replace(self.augment, crop_scale=1.0, blur_probability=0.0, batch_styles_standardization=False)

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        images = decode_tiles([row["pixels"] for row in rows])
        generators = [generator(seed) for seed in seeds]
        draws = torch.stack([torch.rand(VIEW_DRAWS, generator=g) for g in generators])
        noise = torch.stack([torch.rand(self.prefix_tokens + self.patches, generator=g) for g in generators])
        noise[:, :self.prefix_tokens] = -1
        order = torch.argsort(noise, dim=1, stable=True)
        keep = self.prefix_tokens + max(1, int(self.patches * (1 - self.mask_ratio)))
        return {"images": normalise(pathology_view(images, draws, self.augment)),
                "idx_keep": order[:, :keep], "idx_mask": order[:, keep:]}
