"""The first volume classifier a practitioner tries: the foreground's intensity histogram and
simple shape and texture statistics (the `baseline` init; the fine-tune stage fits the logistic
regression).

Rows hold the preprocessed cubes, normalised by modality; the foreground is what preprocess
cropped to (voxels above `preprocess.foreground_threshold`). Per cube: the share of foreground
voxels in each of HISTOGRAM_BINS fixed bins (over [0, 1], or [-3, 3] z-scores under
`mr_normalisation: zscore`); the foreground's volume fraction, centroid, spread (standard
deviation of its voxel coordinates) and bounding-box extent per axis, as fractions of the cube's
side; its intensity mean, standard deviation, skewness and kurtosis; and the mean gradient
magnitude inside it and over the whole cube (edge strength, a first texture measure). Columns
are standardised by the pool's mean and standard deviation (fitted without labels, on the pool
only).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ssl_models.core.config import DomainConfig
from ssl_models.core.errors import PipelineError
from ssl_models.core.features import standardise_by_pool

log = logging.getLogger("finetune")

HISTOGRAM_BINS = 16
# volume fraction; centroid, spread and extent per axis; mean, std, skewness, kurtosis; gradient inside
FOREGROUND_STATISTICS = 1 + 3 * 3 + 4 + 1


def decode_cube(row: dict[str, Any]) -> np.ndarray:
    """A stored cube (float16 bytes and its shape) -> float64 array."""
    shape = tuple(int(side) for side in row["shape"])
    if len(shape) != 3 or int(np.prod(shape)) * 2 != len(row["image"]):
        raise PipelineError(f"a labeled volume's shape {list(shape)} does not match its {len(row['image'])} bytes; "
                            "re-run preprocess")
    return np.frombuffer(row["image"], dtype=np.float16).reshape(shape).astype(np.float64)


def intensity_range(cfg: DomainConfig) -> tuple[float, float]:
    """The fixed histogram range: normalised intensities lie in [0, 1], z-scores mostly in [-3, 3]."""
    return (-3.0, 3.0) if cfg.preprocess.mr_normalisation == "zscore" else (0.0, 1.0)


def cube_features(cube: np.ndarray, threshold: float, value_range: tuple[float, float]) -> np.ndarray:
    """Histogram, shape and texture statistics of one cube's foreground, in that order."""
    from scipy.stats import kurtosis, skew

    foreground = cube > threshold
    values = cube[foreground]
    gradient = np.sqrt(sum(np.square(axis) for axis in np.gradient(cube))) if min(cube.shape) > 1 \
        else np.zeros_like(cube)
    low, high = value_range
    counts, _ = np.histogram(np.clip(values, low, high), bins=HISTOGRAM_BINS, range=(low, high))
    if values.size == 0:  # an empty cube: only its whole-cube gradient says anything
        shape_and_moments = np.zeros(FOREGROUND_STATISTICS)
    else:
        sides = np.array(cube.shape, dtype=np.float64)
        coordinates = np.argwhere(foreground) / sides  # [voxels, 3] in [0, 1)
        extent = (coordinates.max(axis=0) - coordinates.min(axis=0)) + 1 / sides
        flat = values.std() < 1e-12  # skewness and kurtosis are undefined without spread
        shape_and_moments = np.concatenate([
            [values.size / cube.size], coordinates.mean(axis=0), coordinates.std(axis=0), extent,
            [values.mean(), values.std(), 0.0 if flat else skew(values), 0.0 if flat else kurtosis(values)],
            [gradient[foreground].mean()]])
    return np.concatenate([counts / max(values.size, 1), shape_and_moments, [gradient.mean()]])


def features(cfg: DomainConfig, pool: list[dict[str, Any]], test: list[dict[str, Any]]) -> tuple[Any, Any]:
    """[rows, features] float32 of the pool and test volumes (foreground histogram and statistics)."""
    if not pool:
        raise PipelineError(f"domains.{cfg.name}: no labeled pool rows for the histogram baseline; check the labels "
                            "CSV and the split settings")
    threshold, value_range = cfg.preprocess.foreground_threshold, intensity_range(cfg)
    pool_features = np.stack([cube_features(decode_cube(row), threshold, value_range) for row in pool])
    test_features = np.stack([cube_features(decode_cube(row), threshold, value_range) for row in test]) if test \
        else np.zeros((0, pool_features.shape[1]))
    log.info("finetune %s: baseline of %d foreground histogram, shape and texture statistics per volume",
             cfg.name, pool_features.shape[1])
    return standardise_by_pool(pool_features, test_features)
