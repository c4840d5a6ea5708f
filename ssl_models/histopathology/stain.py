"""Tissue detection, pen-mark detection and Macenko stain normalisation, on RGB uint8 arrays."""

from __future__ import annotations

import numpy as np

# RGB rules for marker ink from Deep Histopath (IBM, "filter_red_pen" ...) as used by histolab:
# a pixel is ink when R > r, G < g, B < b (red); R < r, G > g, B > b (green); R < r, G < g, B > b (blue).
RED_PEN = [(150, 80, 90), (110, 20, 30), (185, 65, 105), (195, 85, 125), (220, 115, 145),
           (125, 40, 70), (100, 50, 65), (85, 25, 45)]
GREEN_PEN = [(150, 160, 140), (70, 110, 110), (45, 115, 100), (30, 75, 60), (195, 220, 210),
             (225, 230, 225), (170, 210, 200), (20, 30, 20), (50, 60, 40), (30, 50, 35),
             (65, 70, 60), (100, 110, 105), (165, 180, 180), (140, 140, 150), (185, 195, 195)]
BLUE_PEN = [(60, 120, 190), (120, 170, 200), (175, 210, 230), (145, 180, 210), (37, 95, 160),
            (30, 65, 130), (130, 155, 200), (40, 35, 85), (30, 20, 65), (90, 90, 140),
            (60, 60, 120), (110, 110, 175)]


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] (max - min) / max, 0 for black."""
    rgb = rgb.astype(np.float32)
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)


def tissue_threshold(thumbnail: np.ndarray, low: float, high: float) -> float:
    """Otsu's threshold on saturation, clipped into [low, high]. Glass is grey-white
    (saturation < 0.05), stained tissue above ~0.1; on an image that is all tissue, Otsu
    alone would split the tissue in two halves, hence the clip."""
    from skimage.filters import threshold_otsu

    values = saturation(thumbnail).ravel()
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return low
    return float(np.clip(threshold_otsu(values), low, high))


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of red, green or blue marker ink."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    for tr, tg, tb in RED_PEN:
        mask |= (r > tr) & (g < tg) & (b < tb)
    for tr, tg, tb in GREEN_PEN:
        mask |= (r < tr) & (g > tg) & (b > tb)
    for tr, tg, tb in BLUE_PEN:
        mask |= (r < tr) & (g < tg) & (b > tb)
    return mask


# Macenko et al., "A method for normalizing histology slides for quantitative analysis",
# ISBI 2009. Reference stain vectors and concentrations of the usual H&E target (as in
# torchstain and StainTools).
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308])
LIGHT = 240.0  # transmitted light intensity


class MacenkoNormaliser:
    """Stain vectors fitted on one slide's tissue pixels; `apply` maps a tile of that slide to
    the reference stains."""

    def __init__(self, tissue_pixels: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> None:
        od = -np.log((tissue_pixels.reshape(-1, 3).astype(np.float64) + 1) / LIGHT)
        od = od[(od > beta).all(axis=1)]
        if len(od) < 50:
            raise ValueError(f"only {len(od)} stained pixels to fit stain vectors")
        _, vectors = np.linalg.eigh(np.cov(od.T))
        plane = vectors[:, 1:3]
        projected = od @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, alpha), np.percentile(angles, 100 - alpha)
        first = plane @ np.array([np.cos(low), np.sin(low)])
        second = plane @ np.array([np.cos(high), np.sin(high)])
        stains = np.stack([first, second], axis=1) if first[0] > second[0] else np.stack([second, first], axis=1)
        self.stains = stains * np.sign(stains.sum(axis=0, keepdims=True))  # optical densities are positive
        concentrations = np.linalg.lstsq(self.stains, od.T, rcond=None)[0]
        self.max_concentrations = np.maximum(np.percentile(concentrations, 99, axis=1), 1e-6)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / LIGHT)
        concentrations = np.linalg.lstsq(self.stains, od.T, rcond=None)[0]
        concentrations *= (REFERENCE_MAX_CONCENTRATIONS / self.max_concentrations)[:, None]
        normalised = LIGHT * np.exp(-REFERENCE_STAINS @ concentrations)
        return np.clip(normalised.T, 0, 255).reshape(rgb.shape).astype(np.uint8)
