"""Pathology views on batches of tiles (float [n, 3, s, s] in [0, 1]), drawn from torch's
global (CPU) RNG so that a resumed run draws the same views, on whatever device the batch is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models.histopathology.config import AugmentConfig

# Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution", 2001:
# optical density = concentrations @ STAIN_OD, rows hematoxylin, eosin, DAB (skimage.color's
# rgb_from_hed).
STAIN_OD = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
OD_TO_CONCENTRATIONS = torch.linalg.inv(STAIN_OD)


def hed_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Scale and shift each stain's concentration per image (Tellez et al., "Whole-slide
    mitosis detection in H&E breast histology using PHH3 as a reference", IEEE TMI 2018)."""
    if strength <= 0:
        return images
    n = images.shape[0]
    device = images.device
    od = -torch.log(images.clamp(min=1e-3, max=1.0)).permute(0, 2, 3, 1)  # [n, s, s, 3]
    concentrations = od @ OD_TO_CONCENTRATIONS.to(device)
    alpha = 1 + ((torch.rand(n, 1, 1, 3) * 2 - 1) * strength).to(device)
    beta = ((torch.rand(n, 1, 1, 3) * 2 - 1) * strength).to(device)
    od = (concentrations * alpha + beta) @ STAIN_OD.to(device)
    return torch.exp(-od).clamp(0, 1).permute(0, 3, 1, 2)


def rotate_flip(images: torch.Tensor, rotate90: bool, flip: bool) -> torch.Tensor:
    """Random multiples of 90 degrees and horizontal flips: tissue has no up or left."""
    out = images.clone()
    if rotate90:
        turns = torch.randint(0, 4, (images.shape[0],)).to(images.device)
        for k in range(1, 4):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(out[chosen], k, dims=(2, 3))
    if flip:
        flipped = (torch.rand(images.shape[0]) < 0.5).to(images.device)
        out[flipped] = out[flipped].flip(3)
    return out


def random_resized_crop(images: torch.Tensor, min_scale: float) -> torch.Tensor:
    """A random square crop of [min_scale, 1] of the area per image, resized back (one
    affine grid for the whole batch)."""
    if min_scale >= 1:
        return images
    n = images.shape[0]
    side = torch.sqrt(min_scale + torch.rand(n) * (1 - min_scale))
    centre = (torch.rand(n, 2) * 2 - 1) * (1 - side).unsqueeze(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side, side
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(images: torch.Tensor, probability: float, sigma: float) -> torch.Tensor:
    """Mild blur on a random share of the images (focus varies across a scan)."""
    chosen = (torch.rand(images.shape[0]) < probability).to(images.device)
    if sigma <= 0 or not chosen.any():
        return images
    radius = max(1, int(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    out = images.clone()
    blurred = F.pad(images[chosen], (radius,) * 4, mode="reflect")
    blurred = F.conv2d(blurred, kernel.view(3, 1, 1, -1), groups=3)
    out[chosen] = F.conv2d(blurred, kernel.view(3, 1, -1, 1), groups=3)
    return out


def batch_styles_standardization(images: torch.Tensor, low_frequency: float) -> torch.Tensor:
    """Give every image of the batch the low-frequency Fourier amplitude (the "style": stain
    and scanner colour) of one randomly chosen image of it, keeping each image's phase
    (content). Scalbert et al., "Towards domain-invariant self-supervised learning with
    batch styles standardization", ICLR 2024; the amplitude swap of FDA (Yang & Soatto 2020)."""
    spectrum = torch.fft.fft2(images)
    amplitude, phase = spectrum.abs(), spectrum.angle()
    style = amplitude[torch.randint(0, images.shape[0], (1,))]
    size = images.shape[-1]
    band = max(1, int(low_frequency * size / 2))
    mask = torch.zeros(size, size, dtype=torch.bool, device=images.device)
    for rows in (slice(0, band), slice(size - band, size)):
        for cols in (slice(0, band), slice(size - band, size)):
            mask[rows, cols] = True  # the low frequencies sit in the corners of an unshifted FFT
    amplitude = torch.where(mask, style.expand_as(amplitude), amplitude)
    return torch.fft.ifft2(torch.polar(amplitude, phase)).real.clamp(0, 1)


def pathology_view(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """One augmented view of a batch."""
    view = random_resized_crop(images, cfg.crop_scale)
    view = rotate_flip(view, cfg.rotate90, cfg.flip)
    view = hed_jitter(view, cfg.hed_jitter)
    view = gaussian_blur(view, cfg.blur_probability, cfg.blur_sigma)
    if cfg.batch_styles_standardization:
        view = batch_styles_standardization(view, cfg.bss_low_frequency)
    return view
