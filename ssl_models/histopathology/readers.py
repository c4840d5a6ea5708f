"""Readers for whole-slide images (SVS, pyramidal TIFF, ... through OpenSlide; plain TIFF
through tifffile) and tiles (PNG, JPEG, TIFF; RGB, RGBA, grayscale, 16-bit through Pillow).

Every format opens as a `SlideImage`: pyramid levels and RGB regions read at a level, so
tiling does not care whether a source is a 40x slide or a 512-pixel tile.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.domain import Record, Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.hashing import file_sha256
from ssl_models.core.privacy import without_names

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide")
HISTO_SUFFIXES = TILE_SUFFIXES + SLIDE_SUFFIXES
# Pillow and tifffile decode a whole level at once: a 100,000-pixel-wide plain TIFF (no pyramid) took
# 30 GB at ingest, a 657 KB RGBA PNG of 13000x13000 5 GiB. The default of `ingest.max_pixels`,
# counted as width x height x bands from the header before anything is decoded: 2^28 values is
# Pillow's own decompression-bomb scale (its MAX_IMAGE_PIXELS is 2^28 / 3 RGB pixels), 256 MiB of
# 8-bit samples. OpenSlide reads by region: only the level a thumbnail decodes whole is limited.
MAX_DECODED_PIXELS = 2 ** 28
OPENSLIDE_BANDS = 4  # read_region decodes RGBA
_STRIP_PIXELS = 2 ** 20  # to_rgb converts this many pixels at a time: its float temporaries stay small


class ImageTooLargeError(UnreadableFileError):
    """A level whose decoded size, from the header, exceeds `ingest.max_pixels`."""


def check_decoded_size(width: int, height: int, bands: int, max_pixels: int, what: str = "image") -> None:
    """Refuse, before decoding, a level of width x height x bands values over `max_pixels`."""
    values = int(width) * int(height) * int(bands)
    if values > max_pixels:
        raise ImageTooLargeError(f"{what} of {width}x{height} pixels x {bands} bands ({values}) exceeds "
                                 f"ingest.max_pixels={max_pixels}")


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [h, w, 3] from grayscale, RGBA (composited on white glass) or 16-bit data.

    Converted a strip of rows at a time: compositing RGBA in float32 took 16 bytes a pixel over the
    whole level at once (5 GiB for a 13000-pixel square)."""
    array = np.asarray(pixels)
    if array.ndim < 2 or array.shape[0] * (array.shape[1] if array.ndim > 1 else 1) <= _STRIP_PIXELS:
        return _strip_to_rgb(array, _float_scale(array))
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)):
        raise UnreadableFileError(f"unsupported pixel layout {tuple(array.shape)}")
    scale = _float_scale(array)
    rows = max(1, _STRIP_PIXELS // array.shape[1])
    out = np.empty((array.shape[0], array.shape[1], 3), dtype=np.uint8)
    for top in range(0, array.shape[0], rows):
        out[top:top + rows] = _strip_to_rgb(array[top:top + rows], scale)
    return out


def _float_scale(array: np.ndarray) -> float:
    """The factor that brings the whole image (not one strip) of a float or wide-integer type into 0..255."""
    if array.dtype in (np.uint8, np.uint16):
        return 1.0
    top = float(array.max()) if array.size else 0.0
    return 255.0 if top <= 1.0 else (255.0 / top if top > 255 else 1.0)  # float in [0, 1], or wider ints


def _strip_to_rgb(pixels: np.ndarray, scale: float) -> np.ndarray:
    array = np.asarray(pixels)
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) * 255 + 32767) // 65535  # 16-bit scans: same intensities in 8 bits
    elif array.dtype != np.uint8:
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

    bands = 3  # values a decoded pixel holds (the level decoded whole is limited by them)
    max_pixels = MAX_DECODED_PIXELS  # ingest.max_pixels: width x height x bands a level may decode whole

    def decodable(self, level: int) -> bool:
        """Whether `level` fits `max_pixels` when decoded whole."""
        width, height = self.dimensions[level]
        return width * height * self.bands <= self.max_pixels

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole image, at most `max_side` pixels on its longer side, from the smallest
        level that is at least that large (or the largest that fits `max_pixels` decoded whole)."""
        from PIL import Image

        level = self.level_count - 1
        width, height = self.dimensions[level]
        check_decoded_size(width, height, self.bands, self.max_pixels,
                           "image (no pyramid level small enough to decode whole)" if self.level_count > 1 else "image")
        while level > 0 and max(self.dimensions[level]) < max_side and self.decodable(level - 1):
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

    def __init__(self, loaders: list, dimensions: list[tuple[int, int]], backend: str, bands: int = 3,
                 max_pixels: int = MAX_DECODED_PIXELS) -> None:
        super().__init__(dimensions)
        self.loaders = loaders  # one callable per level, decoding it on first use
        self.cache: dict[int, np.ndarray] = {}
        self.backend = backend
        self.bands, self.max_pixels = bands, max_pixels

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if level not in self.cache:
            # a tile of level 0 of a plain TIFF decodes all of level 0: refused over the limit
            level_width, level_height = self.dimensions[level]
            check_decoded_size(level_width, level_height, self.bands, self.max_pixels,
                               f"pyramid level {level}" if self.level_count > 1 else "image")
            self.cache[level] = to_rgb(self.loaders[level]())
            self.cache[level].flags.writeable = False  # handed out whole below: nobody may change it
        pixels = self.cache[level]
        if (x, y, width, height) == (0, 0, pixels.shape[1], pixels.shape[0]):
            return pixels  # the whole level (a thumbnail's source): no second copy of it
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        top, left = max(0, y), max(0, x)
        bottom, right = min(pixels.shape[0], y + height), min(pixels.shape[1], x + width)
        if bottom > top and right > left:
            out[top - y:bottom - y, left - x:right - x] = pixels[top:bottom, left:right]
        return out


class OpenSlideImage(SlideImage):
    backend = "openslide"

    bands = OPENSLIDE_BANDS

    def __init__(self, slide: Any, max_pixels: int = MAX_DECODED_PIXELS) -> None:
        self.max_pixels = max_pixels
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


@contextlib.contextmanager
def _pillow_image(path: Path, max_pixels: int) -> Iterator[Any]:
    """The image opened lazily (its header only), its decoded size (the header's size and bands)
    checked against `max_pixels`; closed after the block."""
    from PIL import Image

    # Pillow's own guard at the same scale while it opens the file (it warns over MAX_IMAGE_PIXELS and
    # refuses twice that, counting pixels, not bands); the check below, on the header's size and
    # bands, decides. Put back after: other code of the process opens its own images with Pillow
    pillows_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # lazy: the header only
    except Image.DecompressionBombError as error:  # over twice the limit in pixels alone
        raise ImageTooLargeError(f"image exceeds ingest.max_pixels={max_pixels}: {error}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillows_limit
    with image:
        check_decoded_size(image.width, image.height, max(3, len(image.getbands())), max_pixels)
        yield image


def _open_with_pillow(path: Path, max_pixels: int) -> SlideImage:
    with _pillow_image(path, max_pixels) as image:
        bands = max(3, len(image.getbands()))  # decoded as they are, converted to RGB
        image.load()  # decode now: a truncated file fails here, not in the middle of preprocess
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "RGB", "RGBA", "L", "LA"):
            array = np.asarray(image)  # to_rgb converts these itself, a strip at a time
        else:  # palette, CMYK, YCbCr, 1-bit
            array = np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
        size = (image.width, image.height)
    return InMemoryLevels([lambda: array], [size], "pillow", bands, max_pixels)


def _checked_png(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a PNG whose every chunk is whole and matches its CRC (Pillow's `verify`:
    the chunks are read, the pixels not inflated), within `max_pixels` by its header."""
    with _pillow_image(path, max_pixels) as image:
        size = image.size
        image.verify()
    return size


def _as_tile(path: Path, open_tile: Callable[[Path, int], Any], max_pixels: int) -> Any:
    """`open_tile(path, max_pixels)` with Pillow's many error types for a corrupt file said as one reason."""
    try:
        return open_tile(path, max_pixels)
    except ImageTooLargeError:
        raise
    except Exception as error:  # Pillow raises many types for corrupt files
        raise UnreadableFileError(f"cannot decode image: {without_names(str(error), [path])}") from None


def _open_with_tifffile(path: Path, max_pixels: int) -> SlideImage:
    import tifffile

    tif = tifffile.TiffFile(path)
    series = tif.series[0]
    levels = list(getattr(series, "levels", None) or [series])
    dimensions = []
    for level in levels:
        axes, shape = level.axes, level.shape
        dimensions.append((int(shape[axes.index("X")]), int(shape[axes.index("Y")])))
    axes, shape = levels[-1].axes, levels[-1].shape
    bands = max(3, int(shape[axes.index("S")]) if "S" in axes else 1)
    smallest = min(width * height for width, height in dimensions)
    if smallest * bands > max_pixels:  # the thumbnail alone would decode a whole level into memory
        tif.close()
        width, height = dimensions[0]
        raise UnreadableFileError(f"image too large to decode whole ({width}x{height} pixels without a smaller "
                                  f"pyramid level; {smallest * bands} values exceed ingest.max_pixels={max_pixels}): "
                                  "convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)")
    return InMemoryLevels([level.asarray for level in levels], dimensions, "tifffile", bands, max_pixels)


def open_slide(path: Path, max_pixels: int = MAX_DECODED_PIXELS) -> SlideImage:
    """Open a slide or tile; `UnreadableFileError` with the reason when no reader can. A level is
    decoded whole only when its width x height x bands (from the header) fit `max_pixels`."""
    suffix = path.suffix.lower()
    errors = []
    if suffix in TILE_SUFFIXES:
        return _as_tile(path, _open_with_pillow, max_pixels)
    import openslide

    try:
        slide = OpenSlideImage(openslide.OpenSlide(str(path)), max_pixels)
    except Exception as error:
        errors.append(f"OpenSlide: {without_names(str(error), [path])}")
    else:
        width, height = slide.dimensions[-1]
        try:  # tiles are read by region; the thumbnail decodes the smallest level whole
            check_decoded_size(width, height, slide.bands, max_pixels, "image (no pyramid level small enough "
                               "to decode whole)" if slide.level_count > 1 else "image")
        except ImageTooLargeError:
            slide.close()
            raise
        return slide
    if suffix in (".tif", ".tiff", ".svs"):
        try:
            return _open_with_tifffile(path, max_pixels)
        except Exception as error:
            errors.append(f"tifffile: {without_names(str(error), [path])}")
    raise UnreadableFileError("cannot open slide (" + "; ".join(errors) + ")")


def _check_min_side(width: int, height: int, min_side: int) -> None:
    if min(width, height) < min_side:
        raise UnreadableFileError(f"image too small ({width}x{height} pixels < ingest.min_side {min_side})")


def read_slide(source: Source, min_side: int, max_pixels: int = MAX_DECODED_PIXELS) -> Record:
    """One record per slide or tile: its hash and pyramid metadata, checked so that a corrupt
    file is quarantined here: a slide's smallest level is decoded (its thumbnail), a JPEG tile
    decoded whole; a PNG tile's chunks are read and checked against their CRCs without decoding
    its pixels, which tiling decodes (a PNG whose compressed data is broken behind valid CRCs is
    quarantined there). A level is decoded whole only within `max_pixels` (ingest.max_pixels)."""
    path = source.paths[0]
    try:
        digest, size = file_sha256(path), path.stat().st_size  # ingest's own digest of it, when it took one
    except OSError as error:
        raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError("empty file")
    if path.suffix.lower() == ".png":
        width, height = _as_tile(path, _checked_png, max_pixels)
        _check_min_side(width, height, min_side)
        meta = {"format": "png", "backend": "pillow", "width": width, "height": height, "levels": 1,
                "mpp": None, "objective": None}  # what the decoded tile's SlideImage says
        return Record(key=source.key, sha256=digest, n_bytes=size, meta=meta)
    slide = open_slide(path, max_pixels)
    try:
        width, height = slide.dimensions[0]
        _check_min_side(width, height, min_side)
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
