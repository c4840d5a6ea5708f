"""The first tile classifier a practitioner tries: stain and texture statistics from
scikit-image (the `baseline` init; the fine-tune stage fits the logistic regression).

Per tile: colour deconvolution into haematoxylin, eosin and DAB optical densities (Ruifrok &
Johnston 2001, `skimage.color.rgb2hed`), each channel's mean, standard deviation and
10th/50th/90th percentiles; grey-level co-occurrence texture (Haralick et al. 1973: contrast,
homogeneity, energy, correlation, at distances 1 and 2 px, averaged over four directions) of
the grey image and of the haematoxylin channel; and the histogram of uniform local binary
patterns of the grey image (Ojala et al. 2002). A slide row (a bag of tiles, `labeled_unit:
slide`) is the mean of its tiles' features. Columns are then standardised by the pool's mean
and standard deviation (fitted without labels, on the pool only).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ssl_models.core.config import DomainConfig
from ssl_models.core.errors import PipelineError
from ssl_models.core.features import standardise_by_pool

log = logging.getLogger("finetune")

PERCENTILES = (10.0, 50.0, 90.0)
GLCM_LEVELS = 32  # grey levels of the co-occurrence matrix: 256 would leave a 32-px tile's matrix almost empty
GLCM_DISTANCES = (1, 2)  # pixels
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPERTIES = ("contrast", "homogeneity", "energy", "correlation")
LBP_POINTS, LBP_RADIUS = 8, 1  # uniform patterns: LBP_POINTS + 2 histogram bins


def decode_tile(blob: bytes) -> np.ndarray:
    """A stored tile (square RGB uint8 bytes) -> [side, side, 3] uint8."""
    side = round((len(blob) / 3) ** 0.5)
    if side * side * 3 != len(blob):
        raise PipelineError(f"a labeled tile holds {len(blob)} bytes, not a square RGB tile; re-run preprocess")
    return np.frombuffer(blob, dtype=np.uint8).reshape(side, side, 3)


def quantise(channel: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values in [low, high] -> integer levels 0..GLCM_LEVELS-1 (uint8)."""
    if high <= low:
        return np.zeros(channel.shape, dtype=np.uint8)
    scaled = (np.clip(channel, low, high) - low) / (high - low)
    return np.minimum((scaled * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)


def co_occurrence_texture(levels: np.ndarray) -> np.ndarray:
    """GLCM properties at each distance, averaged over the directions -> [properties * distances]."""
    from skimage.feature import graycomatrix, graycoprops

    matrix = graycomatrix(levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
    # correlation is undefined (NaN) on a flat tile: no variation to correlate
    return np.nan_to_num(np.concatenate([graycoprops(matrix, name).mean(axis=1) for name in GLCM_PROPERTIES]))


def tile_features(tile: np.ndarray) -> np.ndarray:
    """HED channel statistics, GLCM texture of grey and haematoxylin, and the LBP histogram of one tile."""
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import local_binary_pattern

    hed = rgb2hed(tile).reshape(-1, 3)
    stain = np.concatenate([hed.mean(axis=0), hed.std(axis=0), *np.percentile(hed, PERCENTILES, axis=0)])
    grey = rgb2gray(tile)
    haematoxylin = hed[:, 0].reshape(tile.shape[:2])
    # grey on a fixed scale; haematoxylin rescaled per tile: its level is in `stain`, its texture is the pattern
    texture = np.concatenate([co_occurrence_texture(quantise(grey, 0.0, 1.0)),
                              co_occurrence_texture(quantise(haematoxylin, haematoxylin.min(), haematoxylin.max()))])
    patterns = local_binary_pattern((grey * 255).astype(np.uint8), LBP_POINTS, LBP_RADIUS, method="uniform")
    histogram = np.bincount(patterns.astype(np.int64).ravel(), minlength=LBP_POINTS + 2) / patterns.size
    return np.concatenate([stain, texture, histogram])


def row_features(row: dict[str, Any]) -> np.ndarray:
    """One labeled row (a tile, or a slide's bag of tiles): the mean of its tiles' features."""
    return np.mean([tile_features(decode_tile(blob)) for blob in row["pixels"]], axis=0)


def features(cfg: DomainConfig, pool: list[dict[str, Any]], test: list[dict[str, Any]]) -> tuple[Any, Any]:
    """[rows, features] float32 of the pool and test rows (stain and texture statistics)."""
    if not pool:
        raise PipelineError(f"domains.{cfg.name}: no labeled pool rows for the stain/texture baseline; check the "
                            "labels CSV and the split settings")
    if any(not row["pixels"] for row in (*pool, *test)):
        raise PipelineError(f"domains.{cfg.name}: a labeled row holds no tile; re-run preprocess")
    pool_features = np.stack([row_features(row) for row in pool])
    test_features = np.stack([row_features(row) for row in test]) if test else np.zeros((0, pool_features.shape[1]))
    log.info("finetune %s: baseline of %d stain and texture statistics per row", cfg.name, pool_features.shape[1])
    return standardise_by_pool(pool_features, test_features)
