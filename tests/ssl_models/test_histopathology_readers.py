from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_models.core.domain import Source
from ssl_models.core.errors import UnreadableFileError
from ssl_models.histopathology.readers import open_slide, read_slide
from tests.ssl_models.histo_files import SHARED, ihc, needs_shared, save_png, save_pyramid_tiff


def read(path: Path, min_side: int = 8):
    return read_slide(Source(path.name, [path]), min_side)


def test_tiles_in_every_colour_layout_read_as_the_same_rgb(tmp_path: Path) -> None:
    import tifffile

    tissue = ihc(size=40)
    gray = tissue.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([tissue, np.full((40, 40, 1), 255, np.uint8)], axis=2)
    rgba[:10, :, 3] = 0  # a transparent band: outside the scanned area
    paths = {"rgb": save_png(tmp_path / "rgb.png", tissue), "gray": save_png(tmp_path / "gray.png", gray),
             "rgba": save_png(tmp_path / "rgba.png", rgba), "jpeg": tmp_path / "tile.jpeg",
             "tiff16": tmp_path / "tile16.tif"}
    from PIL import Image

    Image.fromarray(tissue).save(paths["jpeg"], quality=95)
    tifffile.imwrite(paths["tiff16"], tissue.astype(np.uint16) * 257)  # 16-bit scan
    pixels = {}
    for name, path in paths.items():
        record = read(path)
        assert (record.meta["width"], record.meta["height"]) == (40, 40)
        with open_slide(path) as slide:
            pixels[name] = slide.read(0, 0, 0, 40, 40)
        assert pixels[name].shape == (40, 40, 3) and pixels[name].dtype == np.uint8
    assert np.array_equal(pixels["rgb"], tissue)
    assert np.array_equal(pixels["gray"][..., 0], gray) and np.array_equal(pixels["gray"][..., 2], gray)
    assert (pixels["rgba"][:10] == 255).all()  # transparent reads as white glass, i.e. background
    assert np.array_equal(pixels["rgba"][10:], tissue[10:])
    assert np.abs(pixels["jpeg"].astype(int) - tissue).mean() < 4
    assert np.abs(pixels["tiff16"].astype(int) - tissue).max() <= 1


def test_pyramidal_tiff_exposes_its_levels(tmp_path: Path) -> None:
    tissue = ihc(size=256)
    path = save_pyramid_tiff(tmp_path / "slide.tif", tissue)
    record = read(path)
    assert record.meta["levels"] == 2 and (record.meta["width"], record.meta["height"]) == (256, 256)
    with open_slide(path) as slide:
        assert slide.dimensions == [(256, 256), (128, 128)]
        assert np.array_equal(slide.read(0, 64, 32, 16, 16), tissue[32:48, 64:80])
        assert slide.read(1, 0, 0, 128, 128).shape == (128, 128, 3)
        assert (slide.read(0, 250, 250, 16, 16)[8:, 8:] == 255).all()  # beyond the edge: glass


def test_unreadable_files_raise_a_reason_without_the_file_name(tmp_path: Path) -> None:
    tissue = ihc(size=64)
    truncated = save_png(tmp_path / "patient-smith.png", tissue)
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = tmp_path / "patient-jones.svs"
    garbage.write_bytes(b"IJrE" + bytes(range(256)) * 4)
    tiny = save_png(tmp_path / "tiny.png", tissue[:4, :4])
    empty = tmp_path / "case-7.tif"
    empty.write_bytes(b"")
    reasons = {}
    for path in (truncated, garbage, tiny, empty):
        with pytest.raises(UnreadableFileError) as caught:
            read(path)
        reasons[path.name] = caught.value.reason
        assert path.stem not in caught.value.reason
    assert "cannot decode image" in reasons["patient-smith.png"]
    assert "cannot open slide" in reasons["patient-jones.svs"]
    assert "too small" in reasons["tiny.png"]
    assert reasons["case-7.tif"] == "empty file"


@needs_shared
def test_real_svs_slides_open_and_the_broken_one_is_refused() -> None:
    record = read(SHARED / "svs-images" / "cmu-1-small-region.svs")
    assert record.meta["backend"] == "openslide" and record.meta["format"] == "svs"
    assert (record.meta["width"], record.meta["height"]) == (2220, 2967)
    assert record.meta["mpp"] == pytest.approx(0.499) and record.meta["objective"] == 20
    assert read(SHARED / "svs-images" / "tcga-cr-7395-01a-01-ts1.svs").meta["levels"] == 2
    assert read(SHARED / "tiff-images" / "kidney-48-5.tif").meta["backend"] == "tifffile"  # plain, not pyramidal
    with pytest.raises(UnreadableFileError, match="cannot open slide"):
        read(SHARED / "svs-images" / "broken.svs")


def test_a_plain_tiff_too_large_to_decode_whole_is_refused_without_decoding(tmp_path: Path) -> None:
    """A plain (non-pyramidal) TIFF opens through tifffile, which decodes a whole level at once: a
    17,000-pixel square one would take 867 MB before the thumbnail, a scanner's full slide 30 GB."""
    import tifffile

    from ssl_models.histopathology.readers import MAX_DECODED_PIXELS

    path = tmp_path / "case-12 plain.tif"
    tifffile.imwrite(path, shape=(17000, 17000, 3), dtype="uint8", photometric="rgb")  # sparse: no data written
    assert 17000 * 17000 > MAX_DECODED_PIXELS
    with pytest.raises(UnreadableFileError, match=r"image too large to decode whole \(17000x17000 pixels") as caught:
        open_slide(path)
    assert "case-12" not in caught.value.reason
