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
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import print_comparison, run_on_shared_data  # noqa: E402

FSDD = REPO.parent / "shared" / "data" / "audio-fsdd" / "recordings"
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
    metrics = run_on_shared_data("audio", OVERRIDES, args.set, lambda folder: layout_fsdd(folder, args.recordings),
                                 "FSDD", ("split", "preprocess", "model", "pretrain"))
    print_comparison(metrics, "clips (unseen speakers)")


if __name__ == "__main__":
    main()
