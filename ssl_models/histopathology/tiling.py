"""Tiling of one slide: a tissue mask on a thumbnail, a grid at the configured level, and
rejection of background and pen-mark tiles, counted by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ssl_models.histopathology.config import HistoPreprocessConfig
from ssl_models.histopathology.readers import SlideImage
from ssl_models.histopathology.stain import MacenkoNormaliser, pen_mask, saturation, tissue_threshold


@dataclass
class Tile:
    """One accepted tile: pixels (stored size) and where it was cut, in pixels of `level`."""

    x: int
    y: int
    level: int
    pixels: np.ndarray
    tissue_fraction: float


@dataclass
class TilingResult:
    tiles: list[Tile] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # grid positions by outcome
    level: int = 0
    threshold: float = 0.0
    stain_normalised: bool = False


def grid_positions(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering the level; an image smaller than one tile gets
    one tile padded with white glass."""
    xs = list(range(0, max(1, width - tile + 1), stride))
    ys = list(range(0, max(1, height - tile + 1), stride))
    return [(x, y) for y in ys for x in xs]


def evenly_spaced(items: list, limit: int) -> list:
    """At most `limit` items spread over the whole list (deterministic, no RNG)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def tile_slide(slide: SlideImage, cfg: HistoPreprocessConfig) -> TilingResult:
    """Tiles of `slide` at `cfg.level` with enough tissue and little pen ink."""
    level = min(cfg.level, slide.level_count - 1)
    width, height = slide.dimensions[level]
    size, stride = cfg.tile_size, cfg.stride or cfg.tile_size
    thumbnail = slide.thumbnail(cfg.thumbnail_size)
    threshold = tissue_threshold(thumbnail, cfg.min_tissue_saturation, cfg.max_tissue_saturation)
    result = TilingResult(level=level, threshold=threshold)
    thumb_tissue = saturation(thumbnail) > threshold
    # thumbnail pixels per level pixel, to pre-select candidates without reading every tile
    fx, fy = thumbnail.shape[1] / width, thumbnail.shape[0] / height
    candidates = []
    for x, y in grid_positions(width, height, size, stride):
        if cfg.spatial_block and (x // cfg.spatial_block != (x + size - 1) // cfg.spatial_block
                                  or y // cfg.spatial_block != (y + size - 1) // cfg.spatial_block):
            result.counts["straddles_spatial_block"] += 1  # would share pixels with another block
            continue
        window = thumb_tissue[int(y * fy):max(int(y * fy) + 1, int((y + size) * fy)),
                              int(x * fx):max(int(x * fx) + 1, int((x + size) * fx))]
        if window.mean() < cfg.min_tissue_fraction / 2:  # clearly glass: not worth reading
            result.counts["background"] += 1
            continue
        candidates.append((x, y))
    sampled = evenly_spaced(candidates, 4 * cfg.max_tiles_per_source)
    result.counts["not_sampled"] += len(candidates) - len(sampled)
    normaliser = _normaliser(thumbnail, thumb_tissue) if cfg.stain_normalisation == "macenko" else None
    result.stain_normalised = normaliser is not None
    accepted = []
    for x, y in sampled:
        pixels = slide.read(level, x, y, size, size)
        tissue = float((saturation(pixels) > threshold).mean())
        if tissue < cfg.min_tissue_fraction:
            result.counts["background"] += 1
        elif float(pen_mask(pixels).mean()) > cfg.max_pen_fraction:
            result.counts["pen_mark"] += 1
        else:
            accepted.append(Tile(x, y, level, pixels, tissue))
    result.tiles = evenly_spaced(accepted, cfg.max_tiles_per_source)
    result.counts["not_sampled"] += len(accepted) - len(result.tiles)
    result.counts["accepted"] = len(result.tiles)
    for tile in result.tiles:
        if normaliser is not None:
            tile.pixels = normaliser.apply(tile.pixels)
        if cfg.stored_size != size:
            tile.pixels = np.asarray(Image.fromarray(tile.pixels).resize(
                (cfg.stored_size, cfg.stored_size), Image.Resampling.BILINEAR))
    return result


def _normaliser(thumbnail: np.ndarray, tissue: np.ndarray) -> MacenkoNormaliser | None:
    try:
        return MacenkoNormaliser(thumbnail[tissue & ~pen_mask(thumbnail)])
    except (ValueError, np.linalg.LinAlgError):
        return None  # too little stained tissue to fit stain vectors: tiles stay as scanned
