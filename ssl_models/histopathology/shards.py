"""preprocess for slides: tile every source of the manifest and write Arrow shards.

`pretrain_train` / `pretrain_val` hold the tiles of those splits (labeled or not; test tiles
never), `labeled` one row per labeled tile (or per labeled slide, with a bag of its tiles).
Every tile row carries its source's key, its coordinates at the tiled level, its split and
its group, so tiles of one slide (or spatial block) never straddle train and test.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ssl_models.core.domain import Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.privacy import without_names
from ssl_models.core.shards import LABELED, PRETRAIN_PARTS, PRETRAIN_TRAIN, PRETRAIN_VAL, ShardWriter
from ssl_models.core.workers import file_stamp, run_items
from ssl_models.histopathology.config import HistoPreprocessConfig
from ssl_models.histopathology.readers import MAX_DECODED_PIXELS, open_slide
from ssl_models.histopathology.tiling import evenly_spaced, tile_slide

log = logging.getLogger("preprocess")


def tile_chunk(job: tuple[tuple[HistoPreprocessConfig, int], list[tuple[dict[str, Any], list[Path]]]]
               ) -> list[dict[str, Any]]:
    """Tile each slide of one chunk, in any process (`ssl_models.core.workers`): its tiles (pixels as
    bytes), grid counts and stain flag, or the reason it failed."""
    (options, max_pixels), chunk = job
    done = []
    for row, paths in chunk:
        try:
            with open_slide(paths[0], max_pixels) as slide:
                result = tile_slide(slide, options)
        except UnreadableFileError as error:  # changed since ingest, or a level that no longer decodes
            done.append({"reason": f"tiling failed: {error.reason}"})
            continue
        except Exception as error:  # pixels that decoded at ingest but fail deeper in the pyramid
            done.append({"reason": f"tiling failed: {type(error).__name__}: {without_names(str(error), paths)[:200]}"})
            continue
        done.append({"reason": None, "counts": dict(result.counts), "stain_normalised": bool(result.stain_normalised),
                     "tiles": [{"x": int(t.x), "y": int(t.y), "level": int(t.level), "pixels": t.pixels.tobytes()}
                               for t in result.tiles]})
    return done


def tile_features() -> Any:
    """The shards' column types: a pretraining tile's pixels as bytes, a labeled row's as a list of
    tiles (one, or a slide's bag)."""
    from datasets import Features, List, Value

    return {"pretrain": Features({"pixels": Value("binary"), "source": Value("string"), "x": Value("int64"),
                                  "y": Value("int64")}),
            "labeled": Features({"sample_id": Value("string"), "pixels": List(Value("binary")),
                                 "label": Value("string"), "split": Value("string"), "group": Value("string"),
                                 "source": Value("string"), "x": Value("int64"), "y": Value("int64")})}


def write_tile_shards(manifest: list[dict[str, Any]], locate: Callable[[dict[str, Any]], Source],
                      options: HistoPreprocessConfig, split_of_block: Callable[[str], str],
                      out_dir: Path, max_pixels: int = MAX_DECODED_PIXELS) -> dict[str, Any]:
    """Tiles written to the shards as each slide's come back (`ShardWriter`): what is held is a
    slide's tiles and the counts, never the corpus' tiles."""
    features = tile_features()
    counts: Counter = Counter()
    labeled_by_split: Counter = Counter()
    quarantine: list[dict[str, str]] = []  # slides that fail tiling, with the reason (the report lists them)
    normalised = 0
    located = ((row, locate(row).paths) for row in manifest)  # a stream: the manifest's rows are not held
    results = run_items(tile_chunk, (options, max_pixels), located,
                        lambda pair: (pair[0]["key"], pair[0]["sha256"], [file_stamp(path) for path in pair[1]]))
    with ShardWriter(out_dir, features["pretrain"], features["labeled"]) as shards:
        for row, result in tqdm(zip(manifest, results), total=len(manifest), desc="tile slides", unit="slide",
                                disable=None):
            reason = result["reason"]
            if reason is not None:
                quarantine.append({"key": row["key"], "reason": reason})
                log.warning("preprocess: a slide could not be tiled (%s); quarantined", reason)
                continue
            counts.update(result["counts"])
            normalised += result["stain_normalised"]
            group = str(row.get("group") or row["sha256"])
            tile_rows = []
            for tile in result["tiles"]:
                if options.spatial_block:
                    tile_group = (f"{group}:block-{tile['x'] // options.spatial_block}-"
                                  f"{tile['y'] // options.spatial_block}")
                    split = split_of_block(tile_group)
                else:
                    tile_group, split = group, row["split"]
                blob = tile["pixels"]
                if split in PRETRAIN_PARTS:
                    shards.add(PRETRAIN_PARTS[split], {"pixels": blob, "source": row["key"], "x": tile["x"],
                                                       "y": tile["y"]})
                if row.get("label") is None:
                    continue
                sample_id = hashlib.sha256(f"{row['sha256']}:{tile['level']}:{tile['x']}:{tile['y']}"
                                           .encode()).hexdigest()
                tile_rows.append({"sample_id": sample_id, "pixels": [blob], "label": str(row["label"]),
                                  "split": split, "group": tile_group, "source": row["key"], "x": tile["x"],
                                  "y": tile["y"]})
            if not tile_rows:
                continue
            if options.labeled_unit == "tile":
                for tile_row in tile_rows:
                    shards.add(LABELED, tile_row)
                    labeled_by_split[tile_row["split"]] += 1
            else:  # one row per slide: a bag of its tiles, mean-pooled by the encoder
                bag = evenly_spaced(tile_rows, options.max_tiles_per_slide_bag)
                shards.add(LABELED, {"sample_id": row["sha256"], "pixels": [blob for t in bag for blob in t["pixels"]],
                                     "label": str(row["label"]), "split": row["split"], "group": group,
                                     "source": row["key"], "x": -1, "y": -1})
                labeled_by_split[row["split"]] += 1
        rows = shards.close()
    return {"tile_size": options.stored_size, "level": options.level, "labeled_unit": options.labeled_unit,
            "sources_tiled": len(manifest) - len(quarantine), "sources_failed": len(quarantine),
            "quarantine": quarantine,
            "sources_stain_normalised": normalised, "tile_positions": dict(sorted(counts.items())),
            "pretrain_train_tiles": rows[PRETRAIN_TRAIN], "pretrain_val_tiles": rows[PRETRAIN_VAL],
            "labeled_rows_by_split": {s: labeled_by_split[s] for s in ("train", "val", "test")},
            "labeled_test": labeled_by_split["test"]}  # tiles (or slides) scored
