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


def grid_positions(width: int, height: int, tile: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (x, y) of the tiles covering the level, row by row; an image smaller
    than one tile gets one tile padded with white glass."""
    ys, xs = np.meshgrid(np.arange(0, max(1, height - tile + 1), stride),
                         np.arange(0, max(1, width - tile + 1), stride), indexing="ij")
    return xs.ravel(), ys.ravel()


def window_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int,
                     fx: float, fy: float) -> np.ndarray:
    """Share of True in `mask` under each tile (tile coordinates scaled by fx, fy into the mask),
    for millions of positions at once through an integral image."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.minimum((xs * fx).astype(int), mask.shape[1] - 1)
    y0 = np.minimum((ys * fy).astype(int), mask.shape[0] - 1)
    x1 = np.clip(((xs + size) * fx).astype(int), x0 + 1, mask.shape[1])
    y1 = np.clip(((ys + size) * fy).astype(int), y0 + 1, mask.shape[0])
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((x1 - x0) * (y1 - y0))


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
    xs, ys = grid_positions(width, height, size, stride)
    if cfg.spatial_block:  # a tile across a block border would share pixels with another block
        block = cfg.spatial_block
        inside = (xs // block == (xs + size - 1) // block) & (ys // block == (ys + size - 1) // block)
        result.counts["straddles_spatial_block"] += int((~inside).sum())
        xs, ys = xs[inside], ys[inside]
    # clearly glass on the thumbnail: not worth reading
    tissue = window_fractions(thumb_tissue, xs, ys, size, thumbnail.shape[1] / width, thumbnail.shape[0] / height)
    keep = tissue >= cfg.min_tissue_fraction / 2
    result.counts["background"] += int((~keep).sum())
    candidates = list(zip(xs[keep].tolist(), ys[keep].tolist()))
    sampled = evenly_spaced(candidates, 4 * cfg.max_tiles_per_source)
    result.counts["not_sampled"] += len(candidates) - len(sampled)
    normaliser = _normaliser(thumbnail, thumb_tissue) if cfg.stain_normalisation == "macenko" else None
    result.stain_normalised = normaliser is not None
    accepted = []
    for x, y in sampled:
        pixels = slide.read(level, x, y, size, size)
        tile_tissue = float((saturation(pixels) > threshold).mean())
        if tile_tissue < cfg.min_tissue_fraction:
            result.counts["background"] += 1
        elif float(pen_mask(pixels).mean()) > cfg.max_pen_fraction:
            result.counts["pen_mark"] += 1
        else:
            accepted.append(Tile(x, y, level, pixels, tile_tissue))
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
