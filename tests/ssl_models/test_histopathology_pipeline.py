"""The histopathology domain through the stages: the embedded default end to end, and real
slides from ../shared (a broken one among them) with tissue-of-origin labels."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.io import read_json, read_jsonl
from tests.conftest import run_stages, write_params
from tests.ssl_models.histo_files import SHARED, histo_params, needs_shared


@pytest.fixture
def histo_project(tmp_path: Path) -> Path:
    import torch

    threads = torch.get_num_threads()
    write_params(tmp_path, histo_params())
    yield tmp_path
    torch.set_num_threads(threads)  # cpu_threads set it for the stages


@pytest.mark.slow
def test_default_histology_path_end_to_end(histo_project: Path) -> None:
    root = histo_project
    run_stages(root, "histo", "default_data", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report")
    with open(root / "data/histo/default/labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    assert len(labels) == 64 and {r["label"] for r in labels} == {"dab-high", "dab-low"}  # 64-px regions
    shards = read_json(root / "data/histo/shards/summary.json")
    assert shards["tile_positions"]["background"] > 0  # lumen and glass of the image are rejected
    assert shards["pretrain_train_tiles"] > 150  # 9 overlapping tiles per region at stride 16
    from datasets import load_from_disk

    labeled = load_from_disk(str(root / "data/histo/shards/labeled"))
    splits_per_region = {}
    for row in labeled:
        splits_per_region.setdefault(row["source"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_per_region.values()) and len(splits_per_region) > 30
    metrics = read_json(root / "reports/histo/metrics.json")
    assert {r["init"] for r in metrics["results"]} == {"ssl", "scratch", "baseline"}
    report = (root / "reports/histo/report/report.md").read_text()
    assert "DAB" in report and "not from a pathologist" in report and "scikit-image" in report
    assert "1 quarantined" not in report and "No file was quarantined" in report
    assert (root / "models/histo/pretrain/encoder/model.safetensors").is_file()
    log = read_json(root / "models/histo/pretrain/log.json")
    assert log["checkpoints"][-1]["step"] == 6 and all(np.isfinite(c["loss"]) for c in log["checkpoints"])
    # killed after step 3's checkpoint: the resumed run redraws steps 4-6's views from their seeds
    weights = (root / "models/histo/pretrain/encoder/model.safetensors").read_bytes()
    (root / "models/histo/checkpoints/step_00000006.pt").unlink()
    run_stages(root, "histo", "pretrain")
    assert (root / "models/histo/pretrain/encoder/model.safetensors").read_bytes() == weights


def write_tissue_of_origin_labels(path: Path) -> None:
    rows = [("svs-images/cmu-1-small-region.svs", "cmu-1"), ("svs-images/tcga-cr-7395-01a-01-ts1.svs", "tcga-cr"),
            ("svs-images/broken.svs", "cmu-1")]  # the kidney image is unlabeled: one block, never in train
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])


@pytest.mark.slow
@needs_shared
def test_real_slides_with_a_broken_one_run_ingest_and_tiling_by_spatial_block(histo_project: Path) -> None:
    corpus = histo_project / "lab_slides"
    for folder in ("svs-images", "tiff-images"):
        shutil.copytree(SHARED / folder, corpus / folder)
    write_tissue_of_origin_labels(histo_project / "labels.csv")
    write_params(histo_project, histo_params(
        corpus="lab_slides", labels="labels.csv",
        preprocess={"level": 0, "tile_size": 64, "scale": 0.5, "spatial_block": 512, "max_tiles_per_source": 60},
        finetune={"label_fractions": [1.0], "seeds": [0]}, privacy={"pseudonymise": False}))  # keys compared below
    run_stages(histo_project, "histo", "ingest", "preprocess")
    quarantine = read_jsonl(histo_project / "data/histo/manifest/quarantine.jsonl")
    assert [q["key"] for q in quarantine] == ["svs-images/broken.svs"]
    assert "cannot open slide" in quarantine[0]["reason"]
    summary = read_json(histo_project / "data/histo/manifest/summary.json")
    assert summary["records"] == 3 and summary["labels_on_quarantined_files"] == 1
    from datasets import load_from_disk

    labeled = load_from_disk(str(histo_project / "data/histo/shards/labeled"))
    assert set(labeled["label"]) == {"cmu-1", "tcga-cr"}
    assert set(labeled["split"]) >= {"train", "test"}
    for label in ("cmu-1", "tcga-cr"):  # tissue of origin: each big slide feeds train and test, by block
        assert {r["split"] for r in labeled if r["label"] == label} >= {"train", "test"}
    blocks = {}
    for row in labeled:
        blocks.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in blocks.values())


def _peak_traced_tiling(root: Path, slides: int) -> int:
    """Peak Python memory (tracemalloc) of an in-process histo preprocess of `slides` distinct crops
    of the IHC image, 32-pixel tiles of 3 KB (ingested first, untraced)."""
    import tracemalloc

    from tests.conftest import run_stage
    from tests.ssl_models.histo_files import ihc, save_png

    image = ihc(size=512)
    for number in range(slides):
        top, left = divmod(number, 8)
        save_png(root / "corpus" / f"slide{number:03d}.png", image[top * 48:top * 48 + 128, left * 48:left * 48 + 128])
    write_params(root, histo_params(corpus="corpus", labels=None, ingest={"workers": 1},
                                    preprocess={"workers": 1}))
    run_stage("ingest", "histo", root)
    tracemalloc.start()
    try:
        summary = run_stage("preprocess", "histo", root)
        assert summary["sources_tiled"] == slides
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tiling_memory_does_not_grow_with_the_slides(tmp_path: Path) -> None:
    """Tiles go to the shards as each slide's come back (`ShardWriter`, its buffer made 64 KiB here),
    not gathered for the whole archive first, and a chunk of tiling carries one slide: five times the
    slides, about the same peak. With the buffer never flushed (every tile held to the end, as the
    code before did) the peak grew 97 KB a slide here. In a fresh interpreter, as the ingest memory
    tests."""
    from tests.conftest import peaks_in_a_fresh_interpreter

    small, large = peaks_in_a_fresh_interpreter(
        tmp_path, "tests.ssl_models.test_histopathology_pipeline:_peak_traced_tiling", (3, 8, 40),
        "from ssl_models.core.shards import ShardWriter\nShardWriter.FLUSH_BYTES = 64 * 1024")
    per_slide = (large - small) / 32
    assert per_slide < 15_000, f"{per_slide:.0f} bytes more per slide ({small} -> {large} bytes at peak)"
