"""Pretraining throughput on the CPU and, when there is one, on a CUDA GPU (bf16 autocast), side
by side in one run, through the real stages (ingest -> preprocess -> pretrain -> finetune ->
evaluate) of the 3D medical domain on generated blob volumes. Prints steps per second per
device, their ratio, and the GPU run's AUROC (a smoke check that the GPU path learns).

    python benchmarks/device_throughput.py [--steps 60] [--size 32]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tasks.cli import run_stage  # noqa: E402


def layout(folder: Path, n: int, size: int) -> None:
    """`n` noisy balls, every second one with a bright blob at a random place: a learnable binary task."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    radius = np.sqrt((np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")) ** 2).sum(0))
    (folder / "corpus").mkdir(parents=True)
    for i in range(n):
        volume = (radius < 0.9) * (100 + 10 * rng.standard_normal(radius.shape))
        if i % 2:
            volume += 150 * (np.roll(radius, tuple(rng.integers(-size // 5, size // 5, 3)), (0, 1, 2)) < 0.3)
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), folder / "corpus" / f"v{i:03d}.nii.gz")
    with open(folder / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label")] + [(f"v{i:03d}.nii.gz", "blob" if i % 2 else "plain")
                                                            for i in range(n)])


def params(steps: int, size: int) -> dict:
    return {"domains": {"medical": {
        "module": "medical3d", "corpus": "corpus", "labels": "labels.csv",
        "split": {"val": 0.1, "test": 0.3, "salt": "split-v1"}, "privacy": {"salt_file": "salt"},
        "preprocess": {"spacing": None, "crop_foreground": False},
        "model": {"backbone": "vit", "size": size, "patch_size": 8, "hidden_size": 192, "num_layers": 4,
                  "num_heads": 4, "mlp_dim": 384},
        "pretrain": {"method": "mae", "steps": steps, "batch_size": 64, "learning_rate": 0.001, "warmup_steps": 5,
                     "checkpoint_every": steps, "rankme_samples": 64},
        "finetune": {"label_fractions": [0.2, 1.0], "seeds": [0], "max_steps": 20, "batch_size": 16},
    }}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--volumes", type=int, default=160)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        layout(root, args.volumes, args.size)
        (root / "params.yaml").write_text(yaml.safe_dump(params(args.steps, args.size)))
        run_stage("ingest", "medical", root)
        run_stage("preprocess", "medical", root)
        rates = {}
        for device in devices:
            os.environ["SSL_PIPELINE_DEVICE"] = device
            for folder in ("models/medical/pretrain", "models/medical/checkpoints"):
                shutil.rmtree(root / folder, ignore_errors=True)
            started = time.perf_counter()
            history = run_stage("pretrain", "medical", root)
            seconds = time.perf_counter() - started
            rates[device] = args.steps / seconds
            print(f"{device}: {args.steps} MAE steps (batch 64, {args.size}^3, ViT 4x192) in {seconds:.1f} s: "
                  f"{rates[device]:.2f} steps/s; final loss {history['checkpoints'][-1]['loss']:.3f}")
        if "cuda" in rates:
            print(f"GPU ({torch.cuda.get_device_name()}) / CPU ({os.cpu_count()} cores): "
                  f"{rates['cuda'] / rates['cpu']:.1f}x")
        run_stage("finetune", "medical", root)
        metrics = run_stage("evaluate", "medical", root)
        print(f"finetune + evaluate on {devices[-1]}: {metrics['primary_metric']} {metrics['summary']}")


if __name__ == "__main__":
    main()
