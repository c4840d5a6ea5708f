"""preprocess for audio: records -> `pretrain_train`, `pretrain_val` and `labeled` Arrow shards,
plus the spectrogram normalisation statistics of the training split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from datasets import Features, Value

from ssl_models.audio.features import InputSpec, RunningMoments, centre_crop, crops, encode_row, model_input
from ssl_models.core.domain import Record
from ssl_models.core.shards import LABELED, PRETRAIN_PARTS, PRETRAIN_TRAIN, PRETRAIN_VAL, ShardWriter

PRETRAIN_COLUMNS = ("input", "length")
FEATURES = Features({"sample_id": Value("string"), "input": Value("binary"), "length": Value("int64"),
                     "label": Value("string"), "split": Value("string"), "group": Value("string")})


def write_audio_shards(records: Iterable[tuple[dict[str, Any], Record]], spec: InputSpec,
                       out_dir: Path) -> dict[str, Any]:
    """Pretraining crops of the train and val splits (the test split is never pretrained on),
    one centre-cropped clip per labeled record, from (manifest row, record) pairs, each written as
    it is made (`ShardWriter`); returns the counts."""
    moments = RunningMoments(spec.width)
    seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
    with ShardWriter(out_dir, {PRETRAIN_TRAIN: PRETRAIN_COLUMNS, PRETRAIN_VAL: PRETRAIN_COLUMNS,
                               LABELED: tuple(FEATURES)}, FEATURES) as shards:
        for row, record in records:
            steps = model_input(record.content, spec)
            seconds[row["split"]] += len(record.content) / spec.sample_rate
            if row["split"] in PRETRAIN_PARTS:
                for crop in crops(steps, spec.clip_steps):
                    shards.add(PRETRAIN_PARTS[row["split"]], encode_row(crop))
                if row["split"] == "train":
                    moments.add(steps)  # normalisation from the training split only
            if row.get("label") is not None:
                shards.add(LABELED, {"sample_id": row["sha256"], **encode_row(centre_crop(steps, spec.clip_steps)),
                                     "label": str(row["label"]), "split": row["split"],
                                     "group": str(row.get("group") or row["sha256"])})
        rows = shards.close()
    mean, std = moments.result()
    if spec.kind == "log_mel":
        (out_dir / "normalisation.json").write_text(json.dumps(
            {"computed_on": "train split", "frames": moments.count, "mean": mean, "std": std}))
    return {"input": spec.kind, "clip_steps": spec.clip_steps, "sample_rate": spec.sample_rate,
            **{f"{part}_rows": n for part, n in rows.items()},
            "audio_hours_by_split": {k: round(v / 3600, 4) for k, v in seconds.items()}}
