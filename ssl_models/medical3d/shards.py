"""preprocess for volumes: each volume of the manifest read again, made a cube by the MONAI
transforms of `transforms.py`, and written to Arrow shards.

`pretrain_train` / `pretrain_val` hold the cubes of those splits (labeled or not; test volumes
never), `labeled` one row per labeled volume with its label, split and group. A file that no
longer reads is quarantined with its reason, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Sequence, Value
from tqdm import tqdm

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Locate
from ssl_models.core.errors import UnreadableFileError
from ssl_models.medical3d.readers import read_volume
from ssl_models.medical3d.transforms import preprocess_volume


def write_volume_shards(cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                        locate: Locate) -> dict[str, Any]:
    """The `pretrain_train`, `pretrain_val` and `labeled` shards of `manifest` in `out_dir`, and
    the preprocess summary (cube size, spacing, modalities, quarantine, volumes per shard)."""
    shard_features = {"sample_id": Value("string"), "image": Value("binary"), "shape": Sequence(Value("int32")),
                      "label": Value("string"), "split": Value("string"), "group": Value("string")}
    options, size = cfg.preprocess, cfg.model.size
    columns: dict[str, dict[str, list]] = {name: {"sample_id": [], "image": [], "shape": []}
                                           for name in ("pretrain_train", "pretrain_val", "labeled")}
    for extra in ("label", "split", "group"):
        columns["labeled"][extra] = []
    quarantine: list[dict[str, str]] = []
    for row in tqdm(manifest, desc=f"preprocess {cfg.name}", unit="volume", disable=None):
        try:  # read at ingest, but the file may have changed since: quarantined, not a traceback
            volume = read_volume(locate(row), cfg.ingest)
        except UnreadableFileError as error:
            quarantine.append({"key": row["key"], "reason": f"unreadable at preprocess: {error.reason}"})
            continue
        cube = preprocess_volume(volume.array, volume.spacing, row["modality"], options, size)
        targets = [f"pretrain_{row['split']}"] if row["split"] in ("train", "val") else []
        if row.get("label") is not None:
            targets.append("labeled")
            columns["labeled"]["label"].append(str(row["label"]))
            columns["labeled"]["split"].append(row["split"])
            columns["labeled"]["group"].append(str(row.get("group") or row["sha256"]))
        for target in targets:
            columns[target]["sample_id"].append(row["sha256"])
            columns[target]["image"].append(cube.tobytes())
            columns[target]["shape"].append(list(cube.shape))
    for name, values in columns.items():  # explicit features: an empty split still saves and loads
        features = Features({column: shard_features[column] for column in values})
        Dataset.from_dict(values, features=features).save_to_disk(str(out_dir / name))
    modalities = sorted({row["modality"] for row in manifest})
    return {"cube_size": size, "spacing_mm": options.spacing, "modalities": modalities, "quarantine": quarantine,
            **{f"{name}_volumes": len(values["sample_id"]) for name, values in columns.items()}}
