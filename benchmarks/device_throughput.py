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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.ssl_models.medical_files import blob_volume, write_nifti  # noqa: E402


def layout(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = "blob" if i % 2 else "plain"
        write_nifti(folder / "corpus" / f"v{i:03d}.nii.gz", blob_volume(rng, size, label == "blob"))
        rows.append((f"v{i:03d}.nii.gz", label))
    with open(folder / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])


def params(steps: int, size: int) -> dict:
    return {"domains": {"medical": {
        "module": "medical3d", "corpus": "corpus", "labels": "labels.csv",
        "split": {"val": 0.1, "test": 0.3, "salt": "split-v1"}, "privacy": {"salt_file": "salt"},
        "preprocess": {"spacing": None, "crop_foreground": False},
        "model": {"backbone": "vit", "size": size, "patch_size": 8, "hidden_size": 192, "num_layers": 4,
                  "num_heads": 4, "mlp_dim": 384},
        "pretrain": {"method": "mae", "steps": steps, "batch_size": 64, "learning_rate": 0.001, "warmup_steps": 5,
                     "checkpoint_every": steps, "rankme_samples": 64},
        "finetune": {"label_fractions": [0.2, 1.0], "seeds": [0], "steps": 20, "batch_size": 16},
    }}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--volumes", type=int, default=160)
    args = parser.parse_args()
    from tasks.evaluate import evaluate
    from tasks.finetune import finetune
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.pretrain import pretrain

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        layout(Path(tmp), args.volumes, args.size)
        Path("params.yaml").write_text(yaml.safe_dump(params(args.steps, args.size)))
        ingest("medical")
        preprocess("medical")
        rates = {}
        for device in devices:
            os.environ["SSL_PIPELINE_DEVICE"] = device
            for folder in ("models/medical/pretrain", "models/medical/checkpoints"):
                for path in sorted(Path(folder).glob("**/*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
            started = time.perf_counter()
            history = pretrain("medical")
            seconds = time.perf_counter() - started
            rates[device] = args.steps / seconds
            print(f"{device}: {args.steps} MAE steps (batch 64, {args.size}^3, ViT 4x192) in {seconds:.1f} s: "
                  f"{rates[device]:.2f} steps/s; final loss {history['checkpoints'][-1]['loss']:.3f}")
        if "cuda" in rates:
            print(f"GPU ({torch.cuda.get_device_name()}) / CPU ({os.cpu_count()} cores): "
                  f"{rates['cuda'] / rates['cpu']:.1f}x")
        finetune("medical")
        metrics = evaluate("medical")
        print(f"finetune + evaluate on {devices[-1]}: {metrics['primary_metric']} {metrics['summary']}")


if __name__ == "__main__":
    main()
