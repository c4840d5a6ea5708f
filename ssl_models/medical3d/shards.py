"""preprocess for volumes: each volume of the manifest read again, made a cube by the MONAI
transforms of `transforms.py`, and written to Arrow shards.

`pretrain_train` / `pretrain_val` hold the cubes of those splits (labeled or not; test volumes
never), `labeled` one row per labeled volume with its label, split and group. A file that no
longer reads is quarantined with its reason, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Locate, Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.shards import LABELED, PRETRAIN_PARTS, ShardWriter
from ssl_models.core.workers import file_stamp, run_items
from ssl_models.medical3d.readers import read_volume
from ssl_models.medical3d.transforms import preprocess_volume


def cube_chunk(job: tuple[DomainConfig, list[tuple[dict[str, Any], Source]]]) -> list[dict[str, Any]]:
    """Each volume of one chunk read and made a cube, in any process (`ssl_models.core.workers`): the
    cube's bytes and shape, or the reason it no longer reads."""
    cfg, chunk = job
    done = []
    for row, source in chunk:
        try:
            volume = read_volume(source, cfg.ingest)
        except UnreadableFileError as error:
            done.append({"reason": f"unreadable at preprocess: {error.reason}"})
            continue
        cube = preprocess_volume(volume.array, volume.spacing, row["modality"], cfg.preprocess, cfg.model.size)
        done.append({"reason": None, "cube": cube.tobytes(), "shape": [int(n) for n in cube.shape]})
    return done


def write_volume_shards(cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                        locate: Locate) -> dict[str, Any]:
    """The `pretrain_train`, `pretrain_val` and `labeled` shards of `manifest` in `out_dir`, and
    the preprocess summary (cube size, spacing, modalities, quarantine, volumes per shard)."""
    from datasets import Features, Sequence, Value  # here: the workers making the cubes never load it

    features = Features({"sample_id": Value("string"), "image": Value("binary"), "shape": Sequence(Value("int32")),
                         "label": Value("string"), "split": Value("string"), "group": Value("string")})
    options, size = cfg.preprocess, cfg.model.size
    pretrain_columns = ("sample_id", "image", "shape")
    quarantine: list[dict[str, str]] = []
    located = ((row, locate(row)) for row in manifest)  # a stream: the manifest's rows are not held
    results = run_items(cube_chunk, cfg, located, lambda pair: (pair[0]["key"], pair[0]["sha256"],
                                                                [file_stamp(path) for path in pair[1].paths]))
    modalities: set[str] = set()  # of every row, quarantined or not
    # each cube written as it comes back (`ShardWriter`): a million volumes' cubes are never held
    with ShardWriter(out_dir, pretrain_columns, (*pretrain_columns, "label", "split", "group"), features) as shards:
        for row, result in tqdm(zip(manifest, results), total=len(manifest), desc=f"preprocess {cfg.name}",
                                unit="volume", disable=None):
            modalities.add(row["modality"])
            if result["reason"] is not None:  # read at ingest, but the file may have changed since
                quarantine.append({"key": row["key"], "reason": result["reason"]})
                continue
            cube = {"sample_id": row["sha256"], "image": result["cube"], "shape": list(result["shape"])}
            if row["split"] in PRETRAIN_PARTS:
                shards.add(PRETRAIN_PARTS[row["split"]], cube)
            if row.get("label") is not None:
                shards.add(LABELED, {**cube, "label": str(row["label"]), "split": row["split"],
                                     "group": str(row.get("group") or row["sha256"])})
        rows = shards.close()
    return {"cube_size": size, "spacing_mm": options.spacing, "modalities": sorted(modalities), "quarantine": quarantine,
            **{f"{name}_volumes": n for name, n in rows.items()}}
