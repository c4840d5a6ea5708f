"""The whole 3D medical path on AdrenalMNIST3D (../shared/data/medical3d-adrenalmnist3d): 1,584
real adrenal-shape volumes from abdominal CT (MedMNIST v2), normal vs mass. Writes every volume as
a NIfTI file plus labels.csv (all MedMNIST splits pooled; the pipeline splits by content hash),
runs the domain's stages with `dvc repro` in a temporary project copy with the overrides below,
and prints SSL-vs-scratch AUROC per protocol and label fraction (mean ± std over seeds).

    .venv/bin/python benchmarks/medical_adrenal.py [--size 28|64] [--set pretrain.steps=600 ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import print_comparison, run_on_shared_data  # noqa: E402

ADRENAL = REPO.parent / "shared" / "data" / "medical3d-adrenalmnist3d"
OVERRIDES = {
    "corpus": "adrenal/corpus",
    "labels": "adrenal/labels.csv",
    "ingest": {"nifti_modality": "mr"},  # binary shape masks (0/255), not HU
    # masks carry no physical spacing, and the size of the gland is part of the signal: no crop
    "preprocess": {"spacing": None, "crop_foreground": False},
    "finetune": {"label_fractions": [0.01, 0.1, 1.0]},
}


def layout_adrenal(folder: Path, size: int) -> int:
    data = np.load(ADRENAL / f"adrenalmnist3d_{size}.npz")
    corpus = folder / "adrenal" / "corpus"
    corpus.mkdir(parents=True)
    rows = []
    for part in ("train", "val", "test"):
        for i, (volume, label) in enumerate(zip(data[f"{part}_images"], data[f"{part}_labels"], strict=True)):
            name = f"{part}_{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(volume.astype(np.uint8), np.eye(4)), corpus / name)
            rows.append((name, "mass" if int(label[0]) else "normal"))
    with open(folder / "adrenal" / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=28, choices=(28, 64))
    parser.add_argument("--set", action="append", default=[], help="a domains.medical setting, e.g. pretrain.steps=600")
    args = parser.parse_args()
    if not ADRENAL.is_dir():
        sys.exit(f"AdrenalMNIST3D not found at {ADRENAL}")
    metrics = run_on_shared_data("medical", OVERRIDES, args.set, lambda folder: layout_adrenal(folder, args.size),
                                 f"AdrenalMNIST3D {args.size}^3", ("preprocess", "model", "pretrain"))
    print_comparison(metrics, "volumes", metrics.get("comparisons"))


if __name__ == "__main__":
    main()
