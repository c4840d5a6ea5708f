from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ssl_models.core.domain import Source
from ssl_models.core.splits import assign_split
from ssl_models.histopathology.config import HistoPreprocessConfig
from ssl_models.histopathology.readers import open_slide
from ssl_models.histopathology.shards import write_tile_shards
from ssl_models.histopathology.stain import MacenkoNormaliser
from ssl_models.histopathology.tiling import tile_slide
from tests.ssl_models.histo_files import SHARED, ihc, needs_shared, save_png, tissue_on_glass


def tile(path: Path, **settings):
    with open_slide(path) as slide:
        return tile_slide(slide, HistoPreprocessConfig(**settings))


def test_background_tiles_are_rejected_and_counted(tmp_path: Path) -> None:
    path = save_png(tmp_path / "half.png", tissue_on_glass(ihc(32, 0, 128), glass_width=128))
    result = tile(path, tile_size=32)
    # 4 x 8 grid: the 16 positions on glass are background; tissue tiles (some are pale lumen) stay
    assert result.counts["background"] + result.counts["accepted"] == 32
    assert result.counts["background"] >= 16
    assert all(t.x < 128 for t in result.tiles) and result.counts["accepted"] >= 10
    assert all(t.tissue_fraction >= 0.5 for t in result.tiles)
    assert all(t.pixels.shape == (32, 32, 3) for t in result.tiles)


@needs_shared
def test_real_svs_is_tiled_at_a_level_with_coordinates_deterministically() -> None:
    slide = SHARED / "svs-images" / "tcga-cr-7395-01a-01-ts1.svs"
    first = tile(slide, level=1, tile_size=64, scale=0.5, max_tiles_per_source=100)
    again = tile(slide, level=1, tile_size=64, scale=0.5, max_tiles_per_source=100)
    assert first.level == 1 and len(first.tiles) == 100
    assert first.counts["background"] > 100  # the slide has wide empty glass around the tissue
    width, height = 2221, 1783  # level 1
    assert all(0 <= t.x <= width - 64 and 0 <= t.y <= height - 64 for t in first.tiles)
    assert all(t.pixels.shape == (32, 32, 3) for t in first.tiles)  # stored at half size
    assert [(t.x, t.y) for t in first.tiles] == [(t.x, t.y) for t in again.tiles]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first.tiles, again.tiles))
    with open_slide(slide) as opened:  # coordinates point back at the tissue they were cut from
        t = first.tiles[17]
        region = opened.read(1, t.x, t.y, 64, 64)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.fromarray(region).resize((32, 32), Image.Resampling.BILINEAR)), t.pixels)


@needs_shared
def test_pen_marks_are_rejected_and_clean_tissue_is_kept() -> None:
    pen = tile(SHARED / "tiles" / "no-tissue-green-pen.png", tile_size=64)
    red = tile(SHARED / "tiles" / "no-tissue-red-pen.png", tile_size=64)
    clean = tile(SHARED / "tiles" / "tissue-level0-7352-11762-7864-12274.png", tile_size=64)
    assert pen.counts["pen_mark"] >= 20 and pen.counts["accepted"] <= 2
    # red ink: the bright strokes are caught; its dark, out-of-focus purple core looks like
    # hematoxylin by colour alone and is kept
    assert red.counts["pen_mark"] >= 15
    assert clean.counts["pen_mark"] == 0 and clean.counts["accepted"] >= 40


def test_macenko_brings_differently_stained_copies_together() -> None:
    tissue = ihc(0, 0, 256).astype(np.float64)
    # the same tissue scanned with another stain intensity: optical densities scaled per channel
    od = -np.log((tissue + 1) / 240)
    restained = np.clip(240 * np.exp(-od * np.array([1.4, 0.8, 1.1])) - 1, 0, 255).astype(np.uint8)
    original = tissue.astype(np.uint8)
    before = np.abs(original.astype(int) - restained).mean()
    after = np.abs(MacenkoNormaliser(original).apply(original).astype(int)
                   - MacenkoNormaliser(restained).apply(restained)).mean()
    assert after < before / 2


def write_slides(root: Path) -> list[dict]:
    """Six 'slides' (real IHC crops on glass) of three patients; a manifest as ingest writes it."""
    rows = []
    for i in range(6):
        path = save_png(root / f"slide-{i}.png", tissue_on_glass(ihc(64 * (i % 3), 64 * (i // 3), 192), 32))
        rows.append({"key": path.name, "sha256": f"{i:064d}", "label": ["a", "b"][i % 2],
                     "group": f"patient-{i // 2}", "split": ["train", "test", "val"][i // 2]})
    return rows


def shards(tmp_path: Path, rows: list[dict], **settings) -> tuple[dict, object, dict]:
    from datasets import load_from_disk

    options = HistoPreprocessConfig(tile_size=32, **settings)
    summary = write_tile_shards(rows, lambda r: Source(r["key"], [tmp_path / r["key"]]), options,
                                lambda unit: assign_split(unit, 0.1, 0.3, "split-v1"), tmp_path / "out")
    pretrain = {s: load_from_disk(str(tmp_path / "out" / f"pretrain_{s}")) for s in ("train", "val")}
    return summary, load_from_disk(str(tmp_path / "out" / "labeled")), pretrain


def test_tiles_of_one_slide_or_patient_never_straddle_splits(tmp_path: Path) -> None:
    rows = write_slides(tmp_path)
    summary, labeled, pretrain = shards(tmp_path, rows)
    splits_of = defaultdict(set)
    for row in labeled:
        splits_of[row["source"]].add(row["split"])
        splits_of[row["group"]].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())
    assert {r["split"] for r in labeled} == {"train", "val", "test"}
    test_sources = {r["key"] for r in rows if r["split"] == "test"}
    assert not test_sources & (set(pretrain["train"]["source"]) | set(pretrain["val"]["source"]))
    assert summary["pretrain_train_tiles"] == sum(r["split"] == "train" for r in labeled)
    assert all(len(r["pixels"]) == 1 for r in labeled)


def test_spatial_blocks_split_a_slide_without_sharing_pixels(tmp_path: Path) -> None:
    rows = write_slides(tmp_path)
    summary, labeled, _ = shards(tmp_path, rows, stride=16, spatial_block=64)
    assert summary["tile_positions"]["straddles_spatial_block"] > 0
    per_block = defaultdict(set)
    for row in labeled:
        per_block[row["group"]].add(row["split"])
        assert row["x"] // 64 == (row["x"] + 31) // 64 and row["y"] // 64 == (row["y"] + 31) // 64
    assert all(len(splits) == 1 for splits in per_block.values())
    # one slide now feeds several splits, block by block
    assert max(len({r["split"] for r in labeled if r["source"] == s}) for s in {r["source"] for r in labeled}) >= 2


def test_slide_level_rows_hold_a_bag_that_the_encoder_mean_pools(tmp_path: Path) -> None:
    import torch

    from ssl_models.core.config import load_config
    from tests.conftest import write_params
    from tests.ssl_models.histo_files import histo_params

    rows = write_slides(tmp_path)
    _, labeled, _ = shards(tmp_path, rows, labeled_unit="slide", max_tiles_per_slide_bag=5)
    assert len(labeled) == 6 and all(len(r["pixels"]) == 5 for r in labeled)
    write_params(tmp_path, histo_params(preprocess={"labeled_unit": "slide"}))
    cfg, domain = load_config("histo", tmp_path / "params.yaml")
    torch.manual_seed(0)
    encoder = domain.build_encoder(cfg, tmp_path).eval()
    samples = [labeled[0], labeled[1]]
    with torch.no_grad():
        slides = encoder(encoder.collate(samples))
        tiles = encoder(encoder.collate([{"pixels": [p]} for p in samples[0]["pixels"]]))
    assert slides.shape == (2, encoder.dim)
    assert torch.allclose(slides[0], tiles.mean(0), atol=1e-5)


def test_a_slide_that_fails_tiling_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    """A slide whose pixels decode at ingest but fail in preprocess used to be skipped with a warning."""
    rows = write_slides(tmp_path)
    (tmp_path / rows[1]["key"]).write_bytes((tmp_path / rows[1]["key"]).read_bytes()[:300])  # cut since ingest
    (tmp_path / rows[2]["key"]).unlink()
    summary, labeled, pretrain = shards(tmp_path, rows)
    quarantine = {q["key"]: q["reason"] for q in summary["quarantine"]}
    assert quarantine.keys() == {rows[1]["key"], rows[2]["key"]}
    assert quarantine[rows[1]["key"]].startswith("tiling failed: cannot decode image")
    assert "No such file" in quarantine[rows[2]["key"]]
    assert not any("slide-" in reason or str(tmp_path) in reason for reason in quarantine.values())
    assert summary["sources_failed"] == 2 and summary["sources_tiled"] == 4
    assert {rows[1]["key"], rows[2]["key"]}.isdisjoint(set(labeled["source"]) | set(pretrain["train"]["source"]))


def test_slides_are_pseudonymised_by_default() -> None:
    """Slide file names carry accession and case numbers."""
    from types import SimpleNamespace

    from ssl_models.core.privacy import PrivacyConfig
    from ssl_models.histopathology import Histopathology

    assert Histopathology().pseudonymises(SimpleNamespace(privacy=PrivacyConfig()))
    assert not Histopathology().pseudonymises(SimpleNamespace(privacy=PrivacyConfig(pseudonymise=False)))


def test_a_class_whose_tiles_all_fall_in_test_blocks_stops_preprocess(tmp_path: Path) -> None:
    """With spatial blocks a tile takes its block's split in preprocess, so ingest cannot check
    that every class reaches the train split: preprocess does, and stops naming the class."""
    import pytest

    from ssl_models.core.errors import PipelineError
    from ssl_models.core.hashing import sha256_file
    from tasks.cli import run_stage
    from tests.conftest import write_params
    from tests.ssl_models.histo_files import histo_params

    corpus = tmp_path / "corpus"
    save_png(corpus / "big.png", ihc(0, 0, 256))
    for offset in range(0, 400, 8):  # a one-block slide whose block hashes into the test split
        small = save_png(corpus / "small.png", ihc(300, offset, 64))
        if assign_split(f"{sha256_file(small)}:block-0-0", 0.1, 0.3, "split-v1") == "test":
            break
    (tmp_path / "labels.csv").write_text("path,label\nbig.png,a\nsmall.png,b\n")
    write_params(tmp_path, histo_params(corpus="corpus", labels="labels.csv", privacy={"pseudonymise": False},
                                        preprocess={"spatial_block": 64, "tile_size": 32}))
    assert run_stage("ingest", "histo", tmp_path)["labeled"] == 2  # the slides' own splits do not count
    with pytest.raises(PipelineError, match=r"1 class\(es\) have no labeled row in the train split after "
                                            r"preprocess: 'b'"):
        run_stage("preprocess", "histo", tmp_path)
