"""preprocess for audio: records -> `pretrain_train`, `pretrain_val` and `labeled` Arrow shards,
plus the spectrogram normalisation statistics of the training split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from datasets import Features, Value

from ssl_models.audio.features import InputSpec, RunningMoments, centre_crop, crops, encode_row, model_input
from ssl_models.core.domain import Record
from ssl_models.core.shards import write_shards

PRETRAIN_COLUMNS = ("input", "length")
FEATURES = Features({"sample_id": Value("string"), "input": Value("binary"), "length": Value("int64"),
                     "label": Value("string"), "split": Value("string"), "group": Value("string")})


def _columns(rows: list[dict[str, Any]], names: Iterable[str]) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in names}


def write_audio_shards(records: Iterable[tuple[dict[str, Any], Record]], spec: InputSpec,
                       out_dir: Path) -> dict[str, Any]:
    """Pretraining crops of the train and val splits (the test split is never pretrained on),
    one centre-cropped clip per labeled record, from (manifest row, record) pairs; returns the counts."""
    pretrain: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    labeled: list[dict[str, Any]] = []
    moments = RunningMoments(spec.width)
    seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
    for row, record in records:
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
    rows = write_shards(out_dir, pretrain_train=_columns(pretrain["train"], PRETRAIN_COLUMNS),
                        pretrain_val=_columns(pretrain["val"], PRETRAIN_COLUMNS), labeled=_columns(labeled, FEATURES),
                        features=FEATURES)
    mean, std = moments.result()
    if spec.kind == "log_mel":
        (out_dir / "normalisation.json").write_text(json.dumps(
            {"computed_on": "train split", "frames": moments.count, "mean": mean, "std": std}))
    return {"input": spec.kind, "clip_steps": spec.clip_steps, "sample_rate": spec.sample_rate,
            **{f"{part}_rows": n for part, n in rows.items()},
            "audio_hours_by_split": {k: round(v / 3600, 4) for k, v in seconds.items()}}
