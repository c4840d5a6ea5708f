"""The histopathology domain through the stages: the embedded default end to end, and real
slides from ../shared (a broken one among them) with tissue-of-origin labels."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tasks.io import read_json, read_jsonl
from tests.conftest import write_params
from tests.ssl_models.histo_files import SHARED, needs_shared

TINY_HISTO = {
    "module": "histopathology",
    "corpus": "data/histo/default/corpus",
    "labels": "data/histo/default/labels.csv",
    "default_data": {"region_size": 64},
    "split": {"val": 0.1, "test": 0.3, "salt": "split-v1"},
    "preprocess": {"tile_size": 32, "stride": 16},
    "model": {"backbone": "resnet", "width": 8, "depth": 1, "torch_threads": 1},
    "pretrain": {"method": "simclr", "steps": 6, "batch_size": 16, "learning_rate": 0.002, "warmup_steps": 1,
                 "checkpoint_every": 3, "rankme_samples": 32, "seed": 0, "options": {"loss": "dcl"}},
    "finetune": {"label_fractions": [0.1, 1.0], "seeds": [0, 1], "protocols": ["linear", "knn", "finetune"],
                 "steps": 2, "batch_size": 8},
}


def histo_params(**sections: dict) -> dict:
    block = json.loads(json.dumps(TINY_HISTO))
    for name, values in sections.items():
        if isinstance(values, dict):
            block.setdefault(name, {}).update(values)
        else:
            block[name] = values
    return {"domains": {"histo": block}}


@pytest.fixture
def histo_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import torch

    threads = torch.get_num_threads()
    write_params(tmp_path, histo_params())
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    torch.set_num_threads(threads)  # model.torch_threads set it for the stages


def test_default_histology_path_end_to_end(histo_project: Path) -> None:
    from tasks.cli import stage_functions

    stages = stage_functions()
    for stage in ("default_data", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report"):
        stages[stage]("histo")
    with open("data/histo/default/labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    assert len(labels) == 64 and {r["label"] for r in labels} == {"dab-high", "dab-low"}  # 64-px regions
    shards = read_json(Path("data/histo/shards/summary.json"))
    assert shards["tile_positions"]["background"] > 0  # lumen and glass of the image are rejected
    assert shards["pretrain_train_tiles"] > 150  # 9 overlapping tiles per region at stride 16
    from datasets import load_from_disk

    labeled = load_from_disk("data/histo/shards/labeled")
    splits_per_region = {}
    for row in labeled:
        splits_per_region.setdefault(row["source"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_per_region.values()) and len(splits_per_region) > 30
    metrics = read_json(Path("reports/histo/metrics.json"))
    assert {r["init"] for r in metrics["results"]} == {"ssl", "scratch"}
    report = Path("reports/histo/report/report.md").read_text()
    assert "DAB" in report and "not from a pathologist" in report and "scikit-image" in report
    assert "1 quarantined" not in report and "No file was quarantined" in report
    assert Path("models/histo/pretrain/encoder/model.safetensors").is_file()


def write_tissue_of_origin_labels(path: Path) -> None:
    rows = [("svs-images/cmu-1-small-region.svs", "cmu-1"), ("svs-images/tcga-cr-7395-01a-01-ts1.svs", "tcga-cr"),
            ("tiff-images/kidney-48-5.tif", "kidney-ihc"), ("svs-images/broken.svs", "cmu-1")]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])


@needs_shared
def test_real_slides_with_a_broken_one_run_ingest_and_tiling_by_spatial_block(histo_project: Path) -> None:
    from tasks.cli import stage_functions

    corpus = histo_project / "lab_slides"
    for folder in ("svs-images", "tiff-images"):
        shutil.copytree(SHARED / folder, corpus / folder)
    write_tissue_of_origin_labels(histo_project / "labels.csv")
    write_params(histo_project, histo_params(
        corpus="lab_slides", labels="labels.csv",
        preprocess={"level": 0, "tile_size": 64, "scale": 0.5, "spatial_block": 512, "max_tiles_per_source": 60},
        finetune={"label_fractions": [1.0], "seeds": [0]}))
    stages = stage_functions()
    stages["ingest"]("histo")
    stages["preprocess"]("histo")
    quarantine = read_jsonl(Path("data/histo/manifest/quarantine.jsonl"))
    assert [q["key"] for q in quarantine] == ["svs-images/broken.svs"]
    assert "cannot open slide" in quarantine[0]["reason"]
    summary = read_json(Path("data/histo/manifest/summary.json"))
    assert summary["records"] == 3 and summary["labels_on_quarantined_files"] == 1
    from datasets import load_from_disk

    labeled = load_from_disk("data/histo/shards/labeled")
    assert set(labeled["label"]) == {"cmu-1", "tcga-cr", "kidney-ihc"}
    assert set(labeled["split"]) >= {"train", "test"}
    for label in ("cmu-1", "tcga-cr"):  # tissue of origin: each big slide feeds train and test, by block
        assert {r["split"] for r in labeled if r["label"] == label} >= {"train", "test"}
    blocks = {}
    for row in labeled:
        blocks.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in blocks.values())
