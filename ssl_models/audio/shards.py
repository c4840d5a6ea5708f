"""preprocess for audio: records -> `pretrain_train`, `pretrain_val` and `labeled` Arrow shards,
plus the spectrogram normalisation statistics of the training split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset, Features, Value

from ssl_models.audio.features import InputSpec, RunningMoments, centre_crop, crops, encode_row, model_input
from ssl_models.core.domain import Record

PRETRAIN_FEATURES = Features({"input": Value("binary"), "length": Value("int64")})
LABELED_FEATURES = Features({"sample_id": Value("string"), "input": Value("binary"), "length": Value("int64"),
                             "label": Value("string"), "split": Value("string"), "group": Value("string")})


def _columns(rows: list[dict[str, Any]], features: Features) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in features}


def write_shards(records: Iterable[Record], rows_by_key: dict[str, dict[str, Any]], spec: InputSpec,
                 out_dir: Path) -> dict[str, Any]:
    """Pretraining crops of the train and val splits (the test split is never pretrained on),
    one centre-cropped clip per labeled record; returns the counts."""
    pretrain: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    labeled: list[dict[str, Any]] = []
    moments = RunningMoments(spec.width)
    seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
    for record in records:
        row = rows_by_key[record.key]
        steps = model_input(record.content, spec)
        seconds[row["split"]] += len(record.content) / spec.sample_rate
        if row["split"] in pretrain:
            pretrain[row["split"]].extend(encode_row(crop) for crop in crops(steps, spec.clip_steps))
            if row["split"] == "train":
                moments.add(steps)  # normalisation from the training split only
        if row.get("label") is not None:
            labeled.append({"sample_id": row["sha256"], **encode_row(centre_crop(steps, spec.clip_steps)),
                            "label": str(row["label"]), "split": row["split"],
                            "group": str(row.get("group") or row["sha256"])})
    for split, split_rows in pretrain.items():
        Dataset.from_dict(_columns(split_rows, PRETRAIN_FEATURES), features=PRETRAIN_FEATURES).save_to_disk(
            str(out_dir / f"pretrain_{split}"))
    Dataset.from_dict(_columns(labeled, LABELED_FEATURES), features=LABELED_FEATURES).save_to_disk(
        str(out_dir / "labeled"))
    mean, std = moments.result()
    if spec.kind == "log_mel":
        (out_dir / "normalisation.json").write_text(json.dumps(
            {"computed_on": "train split", "frames": moments.count, "mean": mean, "std": std}))
    return {"input": spec.kind, "clip_steps": spec.clip_steps, "sample_rate": spec.sample_rate,
            "pretrain_train_rows": len(pretrain["train"]), "pretrain_val_rows": len(pretrain["val"]),
            "labeled_rows": len(labeled), "audio_hours_by_split": {k: round(v / 3600, 4) for k, v in seconds.items()}}
