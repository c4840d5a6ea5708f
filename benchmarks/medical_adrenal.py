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
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import apply_override, reproduce_stages  # noqa: E402
from tests.conftest import copy_project_code  # noqa: E402  (git + dvc init of a project copy)

ADRENAL = REPO.parent / "shared" / "data" / "medical3d-adrenalmnist3d"
STAGES = ["ingest", "preprocess", "pretrain", "finetune", "evaluate", "report"]
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
    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["medical"]
    for section, values in OVERRIDES.items():
        block[section] = {**block.get(section, {}), **values} if isinstance(values, dict) else values
    for assignment in args.set:
        apply_override(block, assignment)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_files = layout_adrenal(folder, args.size)
        (folder / "params.yaml").write_text(yaml.safe_dump({"domains": {"medical": block}}, sort_keys=False))
        copy_project_code(folder)
        timings = reproduce_stages(folder, "medical", STAGES)
        metrics = yaml.safe_load((folder / "reports" / "medical" / "metrics.json").read_text())
        print(f"AdrenalMNIST3D {args.size}^3: {n_files} volumes; machine: {platform.machine()}, {os.cpu_count()} cores")
        print("settings:", yaml.safe_dump({k: block[k] for k in ("preprocess", "model", "pretrain")},
                                          default_flow_style=True, width=10_000).strip())
        print(" ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings),
              f"total {sum(s for _, s in timings):.0f}s")
        comparisons = json.loads((folder / "reports" / "medical" / "evaluation" / "comparisons.json").read_text())
        print_table(metrics, comparisons)


def print_table(metrics: dict, comparisons: list[dict]) -> None:
    rows = {(r["protocol"], r["label_fraction"], r["init"]): r for r in metrics["results"]
            if r["metric"] == metrics["primary_metric"]}
    wins = {(c["protocol"], c["label_fraction"]): f"{c['ssl_wins']}/{c['n_seeds']}" for c in comparisons
            if c["baseline"] == "scratch"}
    print(f"{metrics['primary_metric']} on {metrics['labeled_test']} test volumes, mean ± std over seeds")
    print(f"{'protocol':<10}{'labels':>8}{'n_train':>9}{'ssl':>16}{'scratch':>16}{'ssl - scratch':>15}{'ssl wins':>10}")
    for protocol, fraction, init in sorted(rows):
        if init != "ssl" or (protocol, fraction, "scratch") not in rows:
            continue
        ssl, scratch = rows[(protocol, fraction, "ssl")], rows[(protocol, fraction, "scratch")]
        print(f"{protocol:<10}{fraction:>8.0%}{ssl['n_train']:>9}{ssl['mean']:>10.3f} ± {ssl['std']:.3f}"
              f"{scratch['mean']:>10.3f} ± {scratch['std']:.3f}{ssl['mean'] - scratch['mean']:>+15.3f}"
              f"{wins[(protocol, fraction)]:>10}")


if __name__ == "__main__":
    main()
