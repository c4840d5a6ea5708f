"""The whole audio path on the Free Spoken Digit Dataset (../shared/data/audio-fsdd): 3,000 real
recordings, 10 digits, 6 speakers, 8 kHz. Lays FSDD out as corpus + labels.csv (label = digit,
group = speaker) in a temporary project copy, runs `dvc repro report@audio` there with the
overrides below written into the copy's params.yaml, and prints SSL-vs-scratch macro-F1 per
protocol and label fraction (mean ± std over seeds) with the stage times.

Splits by speaker hash (salt split-v1): test = nicolas, theo (1,000 clips); val = lucas;
pretraining = george, jackson, yweweler. The labeled pool is train + val (4 speakers).

    .venv/bin/python benchmarks/audio_fsdd.py [--set pretrain.method=masked_spectrogram ...]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import apply_override, reproduce_stages  # noqa: E402
from tests.conftest import copy_project_code  # noqa: E402  (git + dvc init of a project copy)

FSDD = REPO.parent / "shared" / "data" / "audio-fsdd" / "recordings"
STAGES = ["ingest", "preprocess", "pretrain", "finetune", "evaluate", "report"]
OVERRIDES = {
    "corpus": "fsdd/corpus",
    "labels": "fsdd/labels.csv",
    "split": {"val": 0.1, "test": 0.1, "salt": "split-v1"},
    "ingest": {"group_by": "none"},  # FSDD is one flat folder; the speaker comes from labels.csv
}


def layout_fsdd(folder: Path, recordings: Path) -> int:
    corpus = folder / "fsdd" / "corpus"
    corpus.mkdir(parents=True)
    rows = []
    for path in sorted(recordings.glob("*.wav")):
        shutil.copy(path, corpus / path.name)
        digit, speaker, _ = path.stem.split("_")
        rows.append((path.name, digit, speaker))
    with open(folder / "fsdd" / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], help="a domains.audio setting, e.g. pretrain.steps=300")
    parser.add_argument("--recordings", type=Path, default=FSDD, help="the FSDD recordings folder")
    args = parser.parse_args()
    if not args.recordings.is_dir():
        sys.exit(f"FSDD recordings not found at {args.recordings}")
    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["audio"]
    for section, values in OVERRIDES.items():
        block[section] = {**block.get(section, {}), **values} if isinstance(values, dict) else values
    for assignment in args.set:
        apply_override(block, assignment)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_files = layout_fsdd(folder, args.recordings)
        (folder / "params.yaml").write_text(yaml.safe_dump({"domains": {"audio": block}}, sort_keys=False))
        copy_project_code(folder)
        timings = reproduce_stages(folder, "audio", STAGES)
        metrics = yaml.safe_load((folder / "reports" / "audio" / "metrics.json").read_text())
        print(f"FSDD: {n_files} files; machine: {platform.machine()}, {os.cpu_count()} cores")
        print("settings:", yaml.safe_dump({k: block[k] for k in ("split", "preprocess", "model", "pretrain")},
                                          default_flow_style=True, width=10_000).strip())
        print(" ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings),
              f"total {sum(s for _, s in timings):.0f}s")
        print_table(metrics)


def print_table(metrics: dict) -> None:
    rows = {(r["protocol"], r["label_fraction"], r["init"]): r for r in metrics["results"]
            if r["metric"] == metrics["primary_metric"]}
    print(f"{metrics['primary_metric']} on {metrics['labeled_test']} test clips (unseen speakers), mean ± std over seeds")
    print(f"{'protocol':<10}{'labels':>8}{'n_train':>9}{'ssl':>16}{'scratch':>16}{'ssl - scratch':>15}")
    for protocol, fraction, init in sorted(rows):
        if init != "ssl" or (protocol, fraction, "scratch") not in rows:
            continue
        ssl, scratch = rows[(protocol, fraction, "ssl")], rows[(protocol, fraction, "scratch")]
        print(f"{protocol:<10}{fraction:>8.0%}{ssl['n_train']:>9}{ssl['mean']:>10.3f} ± {ssl['std']:.3f}"
              f"{scratch['mean']:>10.3f} ± {scratch['std']:.3f}{ssl['mean'] - scratch['mean']:>+15.3f}")


if __name__ == "__main__":
    main()
