"""Readers for whole-slide images (SVS, pyramidal TIFF, ... through OpenSlide; plain TIFF
through tifffile) and tiles (PNG, JPEG, TIFF; RGB, RGBA, grayscale, 16-bit through Pillow).

Every format opens as a `SlideImage`: pyramid levels and RGB regions read at a level, so
tiling does not care whether a source is a 40x slide or a 512-pixel tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.domain import Record, Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.hashing import sha256_file
from ssl_models.core.privacy import without_names

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide")
HISTO_SUFFIXES = TILE_SUFFIXES + SLIDE_SUFFIXES
# Pillow and tifffile decode a whole level at once: a 100,000-pixel-wide plain TIFF (no pyramid) took
# 30 GB at ingest. 2^28 pixels (768 MiB of RGB) is Pillow's own decompression-bomb scale; OpenSlide
# reads pyramidal slides by region and is not limited.
MAX_DECODED_PIXELS = 2 ** 28


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3] from grayscale, RGBA (composited on white glass) or 16-bit data."""
    array = np.asarray(pixels)
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) * 255 + 32767) // 65535  # 16-bit scans: same intensities in 8 bits
    elif array.dtype != np.uint8:
        top = float(array.max()) if array.size else 0.0
        scale = 255.0 if top <= 1.0 else (255.0 / top if top > 255 else 1.0)  # float in [0, 1], or wider ints
        array = array.astype(np.float64) * scale
    array = np.clip(array, 0, 255).astype(np.uint8) if array.dtype != np.uint8 else array
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (2, 4):  # gray+alpha or RGBA: transparent pixels are background
        alpha = array[..., -1:].astype(np.float32) / 255.0
        colour = array[..., :-1].astype(np.float32)
        array = np.clip(colour * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UnreadableFileError(f"unsupported pixel layout {tuple(np.asarray(pixels).shape)}")
    return np.ascontiguousarray(array)


class SlideImage:
    """A pyramid of RGB levels; coordinates are pixels of the level they name."""

    backend = ""

    def __init__(self, dimensions: list[tuple[int, int]], mpp: float | None = None,
                 objective: float | None = None) -> None:
        self.dimensions = dimensions  # (width, height) per level, level 0 largest
        self.mpp = mpp
        self.objective = objective

    @property
    def level_count(self) -> int:
        return len(self.dimensions)

    def downsample(self, level: int) -> float:
        return self.dimensions[0][0] / self.dimensions[level][0]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3]; parts outside the image read as white glass."""
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole image, at most `max_side` pixels on its longer side, from the smallest
        level that is at least that large."""
        from PIL import Image

        level = self.level_count - 1
        while level > 0 and max(self.dimensions[level]) < max_side:
            level -= 1
        width, height = self.dimensions[level]
        image = self.read(level, 0, 0, width, height)
        factor = max_side / max(width, height)
        if factor < 1:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        return image

    def close(self) -> None:
        pass

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InMemoryLevels(SlideImage):
    """Levels decoded into memory: tiles, and TIFFs that OpenSlide does not read."""

    def __init__(self, loaders: list, dimensions: list[tuple[int, int]], backend: str) -> None:
        super().__init__(dimensions)
        self.loaders = loaders  # one callable per level, decoding it on first use
        self.cache: dict[int, np.ndarray] = {}
        self.backend = backend

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if level not in self.cache:
            self.cache[level] = to_rgb(self.loaders[level]())
        pixels = self.cache[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        top, left = max(0, y), max(0, x)
        bottom, right = min(pixels.shape[0], y + height), min(pixels.shape[1], x + width)
        if bottom > top and right > left:
            out[top - y:bottom - y, left - x:right - x] = pixels[top:bottom, left:right]
        return out


class OpenSlideImage(SlideImage):
    backend = "openslide"

    def __init__(self, slide: Any) -> None:
        properties = slide.properties
        mpp = properties.get("openslide.mpp-x")
        objective = properties.get("openslide.objective-power")
        super().__init__([tuple(d) for d in slide.level_dimensions],
                         float(mpp) if mpp else None, float(objective) if objective else None)
        self.slide = slide

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        factor = self.slide.level_downsamples[level]
        region = self.slide.read_region((round(x * factor), round(y * factor)), level, (width, height))
        return to_rgb(np.asarray(region))  # RGBA: outside the scanned area is transparent

    def close(self) -> None:
        self.slide.close()


def _open_with_pillow(path: Path) -> SlideImage:
    from PIL import Image

    image = Image.open(path)
    image.load()  # decode now: a truncated file fails here, not in the middle of preprocess
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
    else:
        array = np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    return InMemoryLevels([lambda: array], [(image.width, image.height)], "pillow")


def _open_with_tifffile(path: Path) -> SlideImage:
    import tifffile

    tif = tifffile.TiffFile(path)
    series = tif.series[0]
    levels = list(getattr(series, "levels", None) or [series])
    dimensions = []
    for level in levels:
        axes, shape = level.axes, level.shape
        dimensions.append((int(shape[axes.index("X")]), int(shape[axes.index("Y")])))
    smallest = min(width * height for width, height in dimensions)
    if smallest > MAX_DECODED_PIXELS:  # the thumbnail alone would decode a whole level into memory
        tif.close()
        width, height = dimensions[0]
        raise UnreadableFileError(f"image too large to decode whole ({width}x{height} pixels without a smaller "
                                  f"pyramid level; the limit is {MAX_DECODED_PIXELS} pixels): convert it to a "
                                  "tiled pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)")
    return InMemoryLevels([level.asarray for level in levels], dimensions, "tifffile")


def open_slide(path: Path) -> SlideImage:
    """Open a slide or tile; `UnreadableFileError` with the reason when no reader can."""
    suffix = path.suffix.lower()
    errors = []
    if suffix in TILE_SUFFIXES:
        try:
            return _open_with_pillow(path)
        except Exception as error:  # Pillow raises many types for corrupt files
            raise UnreadableFileError(f"cannot decode image: {without_names(str(error), [path])}") from None
    import openslide

    try:
        return OpenSlideImage(openslide.OpenSlide(str(path)))
    except Exception as error:
        errors.append(f"OpenSlide: {without_names(str(error), [path])}")
    if suffix in (".tif", ".tiff", ".svs"):
        try:
            return _open_with_tifffile(path)
        except Exception as error:
            errors.append(f"tifffile: {without_names(str(error), [path])}")
    raise UnreadableFileError("cannot open slide (" + "; ".join(errors) + ")")


def read_slide(source: Source, min_side: int) -> Record:
    """One record per slide or tile: its hash and pyramid metadata. The pixels are checked
    (a thumbnail is decoded) so that a corrupt file is quarantined here, not in preprocess."""
    path = source.paths[0]
    try:
        digest, size = sha256_file(path), path.stat().st_size
    except OSError as error:
        raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError("empty file")
    slide = open_slide(path)
    try:
        width, height = slide.dimensions[0]
        if min(width, height) < min_side:
            raise UnreadableFileError(f"image too small ({width}x{height} pixels < ingest.min_side {min_side})")
        try:
            slide.thumbnail(64)
        except UnreadableFileError:
            raise
        except Exception as error:
            raise UnreadableFileError(f"cannot decode pixels: {without_names(str(error), [path])}") from None
        meta = {"format": path.suffix.lower().lstrip("."), "backend": slide.backend, "width": width,
                "height": height, "levels": slide.level_count,
                "mpp": slide.mpp, "objective": slide.objective}
    finally:
        slide.close()
    return Record(key=source.key, sha256=digest, n_bytes=size, meta=meta)
