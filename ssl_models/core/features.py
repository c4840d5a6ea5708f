"""What the domains' classical baselines share: columns scaled by the labeled pool alone."""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler


def standardise_by_pool(pool: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both scaled by the pool's column mean and standard deviation (scikit-learn's
    StandardScaler: a constant column is only centred), float32. No label is read."""
    scaler = StandardScaler().fit(pool)
    scaled_test = scaler.transform(test) if len(test) else np.zeros((0, pool.shape[1]))
    return scaler.transform(pool).astype(np.float32), scaled_test.astype(np.float32)
