"""preprocess for audio: each file of the manifest read again and made model input on the
stage's engine -> `pretrain_train`, `pretrain_val` and `labeled` Arrow shards, plus the
spectrogram normalisation statistics of the training split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssl_models.audio.features import InputSpec, RunningMoments, centre_crop, crops, encode_row, model_input
from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Record, Source, get_domain
from ssl_models.core.shards import LABELED, PRETRAIN_PARTS, ShardWriter
from ssl_models.core.workers import file_stamp, run_items

PRETRAIN_COLUMNS = ("input", "length")


def features():
    """The shards' columns (`datasets` imported here: the workers that make the rows never load it)."""
    from datasets import Features, Value

    return Features({"sample_id": Value("string"), "input": Value("binary"), "length": Value("int64"),
                     "label": Value("string"), "split": Value("string"), "group": Value("string")})


def audio_chunk(job: tuple[DomainConfig, list[tuple[Source, list[dict[str, Any]]]]]) -> list[list[dict[str, Any]]]:
    """Each source of one chunk read again and made model input, in any process
    (`ssl_models.core.workers`): for each of its manifest rows, in the reader's order, the row's
    split, label, group and digest, its seconds, its pretraining crops (train and val), its
    labeled clip, and (train) the count and float64 column sums of its steps, which the stage adds
    up in the manifest's order: the normalisation statistics are those of one process."""
    cfg, chunk = job
    domain, spec = get_domain(cfg.module), InputSpec.from_config(cfg.ingest, cfg.preprocess)
    done = []
    for source, rows in chunk:
        by_key = {row["key"]: row for row in rows}
        made = []
        for record in domain.read(source, cfg):
            if not isinstance(record, Record) or record.key not in by_key:
                continue
            row, steps = by_key[record.key], model_input(record.content, spec)
            entry: dict[str, Any] = {"split": row["split"], "label": row.get("label"), "sha256": row["sha256"],
                                     "group": row.get("group"), "seconds": len(record.content) / spec.sample_rate}
            if row["split"] in PRETRAIN_PARTS:
                entry["crops"] = [encode_row(crop) for crop in crops(steps, spec.clip_steps)]
            if row["split"] == "train":
                entry["moments"] = {"count": len(steps), "total": steps.sum(axis=0, dtype=np.float64).tobytes(),
                                    "squares": np.square(steps, dtype=np.float64).sum(axis=0).tobytes()}
            if row.get("label") is not None:
                entry["clip"] = encode_row(centre_crop(steps, spec.clip_steps))
            made.append(entry)
        done.append(made)
    return done


def write_audio_shards(cfg: DomainConfig, sources: Iterable[tuple[Source, list[dict[str, Any]]]],
                       spec: InputSpec, out_dir: Path) -> dict[str, Any]:
    """Pretraining crops of the train and val splits (the test split is never pretrained on),
    one centre-cropped clip per labeled record, from (source, its manifest rows) pairs, each source
    made on the stage's engine (`audio_chunk`) and its rows written as they come back
    (`ShardWriter`); returns the counts."""
    moments = RunningMoments(spec.width)
    seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
    results = run_items(audio_chunk, cfg, sources, lambda pair: (
        pair[0].key, [row["sha256"] for row in pair[1]], [file_stamp(path) for path in pair[0].paths]))
    columns = features()
    with ShardWriter(out_dir, PRETRAIN_COLUMNS, tuple(columns), columns) as shards:
        for made in results:
            for entry in made:
                seconds[entry["split"]] += entry["seconds"]
                for crop in entry.get("crops", ()):
                    shards.add(PRETRAIN_PARTS[entry["split"]], crop)
                if "moments" in entry:  # normalisation from the training split only
                    sums = entry["moments"]
                    moments.add_sums(sums["count"], np.frombuffer(sums["total"]), np.frombuffer(sums["squares"]))
                if entry["label"] is not None:
                    shards.add(LABELED, {"sample_id": entry["sha256"], **entry["clip"], "label": str(entry["label"]),
                                         "split": entry["split"], "group": str(entry["group"] or entry["sha256"])})
        rows = shards.close()
    mean, std = moments.result()
    if spec.kind == "log_mel":
        (out_dir / "normalisation.json").write_text(json.dumps(
            {"computed_on": "train split", "frames": moments.count, "mean": mean, "std": std}))
    return {"input": spec.kind, "clip_steps": spec.clip_steps, "sample_rate": spec.sample_rate,
            **{f"{part}_rows": n for part, n in rows.items()},
            "audio_hours_by_split": {k: round(v / 3600, 4) for k, v in seconds.items()}}
