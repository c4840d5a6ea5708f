"""Decompression and header bombs in every domain (issue 21, item 1): small files on disk whose
headers declare huge images, volumes, frames or texts.

Each domain checks the decoded size from the header (every dimension) against its `ingest` limit
before decoding, and reads what it accepts in bounded pieces. The readers run here in a fresh
interpreter under an address-space limit (RLIMIT_AS, as `prlimit --as` in the issue), which
reports its own peak resident memory; the bomb must come back as one reason naming its size and
the setting, the good files beside it must still be read, and the peak must stay under the bound.
The whole stages run on such corpora in the slow test at the end.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, stage_env, write_params

GiB, MiB = 2 ** 30, 2 ** 20
READER_LIMIT = 3 * GiB  # address space of a reader process (the bombs took 3.5 to 5 GiB)
STAGE_LIMIT = 6_000_000_000  # the issue's `prlimit --as=6000000000` (a stage imports torch: ~4 GB of mappings)


def run_limited(code: str, limit: int = READER_LIMIT) -> dict:
    """Run `code` (which fills the dict `result`) in a new interpreter under RLIMIT_AS `limit`;
    returns `result` with `peak_mib`, the process's peak resident memory (VmHWM: ru_maxrss would
    carry over the pytest process's own peak from the fork)."""
    script = ("result = {}\n" + textwrap.dedent(code)
              + "\nimport json, re\nresult['peak_mib'] = int(re.search(r'VmHWM:\\s+(\\d+) kB', "
              "open('/proc/self/status').read()).group(1)) / 1024\nprint(json.dumps(result))\n")

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_memory, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


READ_ALL = """
from ssl_models.core.errors import UnreadableFileError

def outcome(read):
    try:
        found = read()
        return "ok" if found is not None else "none"
    except UnreadableFileError as error:
        return "refused: " + error.reason
"""


# -- bombs ------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int = 13000, height: int = 13000) -> Path:
    """The issue's RGBA PNG: a real IHDR and IDAT (every row filter 0, every pixel 0) of a few MB
    that decode to width x height x 4 bytes."""
    compressor, row = zlib.compressobj(1), bytes(1 + 4 * width)
    rows = b"".join(compressor.compress(row * 64) for _ in range(height // 64))
    rows += compressor.compress(row * (height % 64)) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
                     + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b""))
    return path


def tiled_tiff_bomb(path: Path, side: int = 20000, tile: int = 1024) -> Path:
    """The issue's tiled TIFF that OpenSlide opens (generic-tiff, one level): side x side pixels
    from one zlib tile of zeros written again for every tile position, ~1 MB on disk."""
    import tifffile

    encoded = zlib.compress(bytes(tile * tile * 3), 6)
    count = (-(-side // tile)) ** 2
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, (encoded for _ in range(count)), shape=(side, side, 3), dtype=np.uint8,
                     tile=(tile, tile), photometric="rgb", compression="zlib")
    return path


def nifti_header(shape: tuple[int, ...], dtype: type = np.float32) -> bytes:
    """A NIfTI-1 single-file header (with its 4 extension bytes) declaring `shape`."""
    import nibabel as nib

    image = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4))
    image.header.set_data_shape(shape)
    image.header.set_data_dtype(dtype)
    image.header["vox_offset"] = 352
    return image.header.binaryblock + b"\0" * 4


def gzip_nifti_bomb(path: Path, shape: tuple[int, ...] = (512, 512, 256, 17)) -> Path:
    """A .nii.gz whose header declares a 4D volume of over 4 GiB; its gzip stream holds 16 MiB of
    zeros (the check is on the header: nothing after it is decompressed)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(nifti_header(shape))
        handle.write(bytes(16 * MiB))
    return path


def sparse_4d_nifti(path: Path, first: np.ndarray, time_points: int) -> Path:
    """An uncompressed 4D NIfTI of `time_points` volumes shaped like `first` (float32): the first
    volume written, the others a hole in a sparse file (1 GiB for 256 x 256 x 128 x 32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(nifti_header((*first.shape, time_points)))
        handle.write(np.asfortranarray(first, dtype=np.float32).tobytes(order="F"))
        handle.truncate(352 + first.size * 4 * time_points)
    return path


def dicom_bomb(path: Path, rows: int = 16384, columns: int = 16384, frames: int = 7) -> Path:
    """The issue's multi-frame DICOM: a real CT header declaring rows x columns x frames 16-bit
    pixels, with 64 bytes of pixel data."""
    import pydicom
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = rows, columns, frames
    dataset.PixelData = bytes(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def long_line_text(path: Path, characters: int = 200_000_000) -> Path:
    """The issue's 200 MB text on one line (words, no newline), under the 256 MiB file limit."""
    words = b"clause " * (2 ** 20 // 7)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for _ in range(characters // len(words)):
            handle.write(words)
        handle.write(b"x" * (characters % len(words)))
    return path


# -- histopathology ---------------------------------------------------------------------------------

def test_a_png_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(tmp_path: Path) -> None:
    """657 KB of PNG declaring 13000 x 13000 RGBA reached 5 GiB at ingest; now its header is
    compared with ingest.max_pixels (width x height x bands) and nothing is decoded."""
    from tests.ssl_models.histo_files import ihc, save_png

    bomb = png_bomb(tmp_path / "bomb.png")
    good = save_png(tmp_path / "good.png", ihc(size=96))
    result = run_limited(READ_ALL + f"""
from ssl_models.core.domain import Source
from ssl_models.histopathology.readers import read_slide
result["bomb"] = outcome(lambda: read_slide(Source("bomb.png", [__import__("pathlib").Path({str(bomb)!r})]), 8))
result["good"] = outcome(lambda: read_slide(Source("good.png", [__import__("pathlib").Path({str(good)!r})]), 8))
""")
    assert result["bomb"] == ("refused: image of 13000x13000 pixels x 4 bands (676000000) exceeds "
                              "ingest.max_pixels=268435456")
    assert result["good"] == "ok"
    assert result["peak_mib"] < 200, result  # decoded, the bomb alone is 645 MiB (5 GiB before)


def test_a_tiled_tiff_bomb_opened_by_openslide_is_refused_from_its_level_sizes(tmp_path: Path) -> None:
    """A 1 MB tiled TIFF of 20000 x 20000 pixels (one level) took 4.55 GiB through OpenSlide: its
    thumbnail read the whole level. The smallest level is now checked before any region is read;
    a pyramidal slide with a small level is read as before."""
    from tests.ssl_models.histo_files import ihc, save_pyramid_tiff

    bomb = tiled_tiff_bomb(tmp_path / "bomb.tif")
    good = save_pyramid_tiff(tmp_path / "good.tif", ihc(size=256))
    assert bomb.stat().st_size < 2 * MiB
    result = run_limited(READ_ALL + f"""
from pathlib import Path
from ssl_models.core.domain import Source
from ssl_models.histopathology.readers import open_slide, read_slide
with open_slide(Path({str(good)!r})) as slide:
    result["good_backend"] = slide.backend
result["bomb"] = outcome(lambda: read_slide(Source("bomb.tif", [Path({str(bomb)!r})]), 8))
result["good"] = outcome(lambda: read_slide(Source("good.tif", [Path({str(good)!r})]), 8))
""")
    assert result["bomb"] == ("refused: image of 20000x20000 pixels x 4 bands (1600000000) exceeds "
                              "ingest.max_pixels=268435456")
    assert result["good"] == "ok"
    assert result["peak_mib"] < 200, result  # one level read whole as RGBA is 1.5 GiB (4.55 GiB before)


def test_a_lower_max_pixels_refuses_what_it_no_longer_allows_and_reads_the_rest_as_before(tmp_path: Path) -> None:
    from ssl_models.core.domain import Source
    from ssl_models.core.errors import UnreadableFileError
    from ssl_models.histopathology.readers import read_slide
    from tests.ssl_models.histo_files import ihc, save_png

    rgba = np.dstack([ihc(size=120), np.full((120, 120), 200, np.uint8)])
    path = save_png(tmp_path / "tile.png", rgba)
    source = Source("tile.png", [path])
    assert read_slide(source, 8, max_pixels=120 * 120 * 4).meta["width"] == 120
    with pytest.raises(UnreadableFileError) as caught:
        read_slide(source, 8, max_pixels=120 * 120 * 4 - 1)
    assert caught.value.reason == "image of 120x120 pixels x 4 bands (57600) exceeds ingest.max_pixels=57599"


def test_a_large_rgba_image_converts_strip_by_strip_to_the_same_pixels() -> None:
    """to_rgb composites RGBA a strip of rows at a time (16 bytes a pixel of float temporaries over
    the whole image made the 5 GiB): the pixels are those of the whole-image formula."""
    from ssl_models.histopathology.readers import _STRIP_PIXELS, to_rgb

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (_STRIP_PIXELS // 700 + 37, 1400, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    whole = np.clip(rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(to_rgb(rgba), whole)
    wide = rng.random((_STRIP_PIXELS // 1000 + 5, 1000)) * 4000.0  # float: scaled by the whole image's maximum
    assert np.array_equal(to_rgb(wide)[..., 0], np.clip(wide * (255.0 / wide.max()), 0, 255).astype(np.uint8))


def striped_pyramid_tiff(path: Path, pixels: np.ndarray) -> Path:
    """A two-level pyramid in strips (not tiles): OpenSlide does not read it, tifffile decodes its levels whole."""
    import tifffile
    from PIL import Image

    half = np.asarray(Image.fromarray(pixels).resize((pixels.shape[1] // 2, pixels.shape[0] // 2)))
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, photometric="rgb", subifds=1)
        tif.write(half, photometric="rgb", subfiletype=1)
    return path


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_a_level_over_the_limit_is_never_decoded_whole_for_a_thumbnail_or_for_tiles(tmp_path: Path,
                                                                                    backend: str) -> None:
    """The thumbnail takes the largest level within ingest.max_pixels (not the closest in size);
    tiling a level that would be decoded whole over the limit (tifffile) is refused with the reason,
    while OpenSlide reads the same level by region."""
    from ssl_models.core.errors import UnreadableFileError
    from ssl_models.histopathology.config import HistoPreprocessConfig
    from ssl_models.histopathology.readers import open_slide
    from ssl_models.histopathology.tiling import tile_slide
    from tests.ssl_models.histo_files import ihc, save_pyramid_tiff

    write = striped_pyramid_tiff if backend == "tifffile" else save_pyramid_tiff
    path = write(tmp_path / "slide.tif", ihc(size=256))
    bands = 3 if backend == "tifffile" else 4  # OpenSlide decodes RGBA
    with open_slide(path, max_pixels=128 * 128 * bands) as slide:
        assert slide.backend == backend and slide.dimensions == [(256, 256), (128, 128)]
        assert slide.thumbnail(200).shape == (128, 128, 3)  # level 0 would be the closer match
        assert tile_slide(slide, HistoPreprocessConfig(level=1)).counts["accepted"] > 0
        if backend == "tifffile":
            with pytest.raises(UnreadableFileError) as caught:
                tile_slide(slide, HistoPreprocessConfig(level=0))
            assert caught.value.reason == ("pyramid level 0 of 256x256 pixels x 3 bands (196608) exceeds "
                                           "ingest.max_pixels=49152")
        else:
            assert tile_slide(slide, HistoPreprocessConfig(level=0)).counts["accepted"] > 0
    with open_slide(path) as slide:
        assert slide.thumbnail(200).shape == (200, 200, 3)


# -- medical3d --------------------------------------------------------------------------------------

MEDICAL_READ = READ_ALL + """
from pathlib import Path
from ssl_models.core.domain import Source
from ssl_models.medical3d.config import VolumeIngestConfig
from ssl_models.medical3d.readers import read_volume

def read(path, **limits):
    volume = read_volume(Source(Path(path).name, sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]),
                         VolumeIngestConfig(**limits))
    result.setdefault("shapes", {})[Path(path).name] = list(volume.array.shape)
    return volume
"""


def test_nifti_and_dicom_bombs_are_refused_from_their_headers(tmp_path: Path) -> None:
    """A .nii.gz declaring a 4.3 GiB 4D volume (4.06 GiB before the reader gave up) and a DICOM of
    16384 x 16384 x 7 frames (3.55 GiB, no cap at all): every dimension counts against
    ingest.max_voxels, on the header; the series and volumes beside them are read as before."""
    from tests.ssl_models.medical_files import blob_volume, write_nifti, write_series

    bombs = {"nii": gzip_nifti_bomb(tmp_path / "bomb4d.nii.gz"), "dicom": dicom_bomb(tmp_path / "frames.dcm")}
    write_nifti(tmp_path / "good.nii.gz", blob_volume(np.random.default_rng(0), 16, True))
    write_series(tmp_path / "series", "Doe^Jane", "DOE-1", n_slices=10)
    result = run_limited(MEDICAL_READ + f"""
result["nii"] = outcome(lambda: read({str(bombs["nii"])!r}))
result["dicom"] = outcome(lambda: read({str(bombs["dicom"])!r}))
result["good"] = outcome(lambda: read({str(tmp_path / "good.nii.gz")!r}))
result["series"] = outcome(lambda: read({str(tmp_path / "series")!r}))
""")
    assert result["nii"] == ("refused: volume too large: the header declares 512x512x256x17 voxels (1140850688) "
                             "over ingest.max_voxels=1073741824")
    assert result["dicom"] == ("refused: volume too large: the DICOM headers declare 16384x16384x7 voxels "
                               "(1879048192) over ingest.max_voxels=1073741824")
    assert result["good"] == "ok" and result["series"] == "ok"
    assert result["peak_mib"] < 200, result  # 4.06 and 3.55 GiB before


def test_a_sparse_4d_nifti_reads_only_its_first_volume(tmp_path: Path) -> None:
    """1 GiB of 4D NIfTI (32 time points) took 3.06 GiB: the whole 4D array was loaded for its first
    volume. Now only the first volume is read, slab by slab; with a lower ingest.max_voxels the same
    file is refused by its header, every dimension counted."""
    rng = np.random.default_rng(1)
    first = np.zeros((256, 256, 128), np.float32)
    first[64:192, 64:192, 32:96] = rng.random((128, 128, 64), dtype=np.float32) * 100 + 50
    path = sparse_4d_nifti(tmp_path / "fmri.nii", first, 32)
    assert path.stat().st_size == 352 + GiB and path.stat().st_blocks * 512 < 64 * MiB
    result = run_limited(MEDICAL_READ + f"""
result["default"] = outcome(lambda: read({str(path)!r}))
result["lower"] = outcome(lambda: read({str(path)!r}, max_voxels=2 ** 27))
""")
    assert result["default"] == "ok" and result["shapes"]["fmri.nii"] == [256, 256, 128]
    assert result["lower"] == ("refused: volume too large: the header declares 256x256x128x32 voxels (268435456) "
                               "over ingest.max_voxels=134217728")
    assert result["peak_mib"] < 300, result  # the first volume is 32 MiB of float32 (3.06 GiB before)


def test_the_first_volume_of_a_4d_file_has_the_voxels_and_digest_of_the_whole_read(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Nothing good lost: slab by slab, scaling and reorientation included, the first volume is the
    one the whole-array read gave, so content hashes (and splits) do not move."""
    import nibabel as nib

    from ssl_models.medical3d import readers
    from ssl_models.medical3d.readers import read_nifti, volume_digest

    monkeypatch.setattr(readers, "_SLAB_VOXELS", 40 * 30 * 7)  # slabs of 7 slices: several per volume
    rng = np.random.default_rng(2)
    data = (rng.random((40, 30, 50, 3)) * 3000).astype(np.int16)
    affine = np.array([[0, -1.2, 0, 5], [0.9, 0, 0, 3], [0, 0, -2.5, 1], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(0.37, -1024.5)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = read_nifti(tmp_path / "scaled.nii.gz")
    loaded = nib.load(tmp_path / "scaled.nii.gz")
    whole = np.asarray(nib.as_closest_canonical(loaded).dataobj, dtype=np.float32)[..., 0]
    assert np.array_equal(volume.array, whole)
    import hashlib

    expected = hashlib.sha256(repr((whole.shape, np.round(volume.spacing, 4).tolist())).encode())
    expected.update(np.ascontiguousarray(whole).tobytes())
    assert volume_digest(volume) == expected.hexdigest()


# -- legal text -------------------------------------------------------------------------------------

def test_a_200_mb_single_line_text_is_quarantined_at_ingest_with_its_size(tmp_path: Path) -> None:
    """It passed ingest (under the 256 MiB file limit) and killed preprocess's tokenizer (SIGABRT,
    no `error:` line). Now ingest refuses it by its length after decoding; a .jsonl record over the
    limit is refused alone, the records beside it kept."""
    huge = long_line_text(tmp_path / "dump.txt")
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join([json.dumps({"text": "A clause in a record."}),
                                  json.dumps({"text": "word " * 2_000_001}),
                                  json.dumps({"text": "Another clause entirely."})]) + "\n")
    try:
        result = run_limited(READ_ALL + f"""
from pathlib import Path
from ssl_models.core.domain import Record, Rejected
from ssl_models.legal_text.readers import read_text_file
def read(path):
    return [(r.key, "ok" if isinstance(r, Record) else r.reason)
            for r in read_text_file(Path(path), Path(path).name, "text", "latin-1", 1)]
result["txt"] = outcome(lambda: read({str(huge)!r}))
result["jsonl"] = read({str(records)!r})
""")
    finally:
        huge.unlink()
    assert result["txt"] == ("refused: text too long (200,000,000 characters exceed ingest.max_characters=10000000); "
                             "split the document")
    assert result["jsonl"] == [
        ["records.jsonl#L1", "ok"],
        ["records.jsonl#L2", "text too long (10,000,005 characters exceed ingest.max_characters=10000000); "
                             "split the document"],
        ["records.jsonl#L3", "ok"]]
    assert result["peak_mib"] < 600, result  # the file's bytes and its decoded text, once each


def test_the_tokenizer_gets_bounded_pieces_and_blocks_are_those_of_the_whole_texts(monkeypatch) -> None:
    """preprocess tokenises in pieces cut at whitespace and in batches of bounded size: the blocks
    and the trained vocabulary are those of whole documents, and no call sees more characters."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    from ssl_models.legal_text import shards

    rng = np.random.default_rng(3)
    words = ["the", "court", "held", "that", "clause", "breach", "appeal", "dismissed", "tenant", "rent"]
    texts = [" ".join(rng.choice(words, size=n)) + "." for n in (3, 4000, 15, 2500, 1)]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=60, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"],
                                  show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    whole = shards.pack_blocks(tokenizer, texts, 16)

    seen: list[int] = []
    original = PreTrainedTokenizerFast.__call__

    def counting(self, batch, **kwargs):
        seen.append(sum(len(text) for text in batch))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(shards, "PIECE_CHARACTERS", 500)
    monkeypatch.setattr(shards, "BATCH_CHARACTERS", 2000)
    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", counting)
    pieces = shards.pack_blocks(tokenizer, texts, 16)
    assert np.array_equal(pieces, whole) and len(whole) > 100
    assert len(seen) > 5 and max(seen) < 2000 + 500

    def vocabulary(items) -> dict:
        trained = BertWordPieceTokenizer(lowercase=True)
        trained.train_from_iterator(items, vocab_size=60, show_progress=False,
                                    special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
        return trained.get_vocab()

    # the same tokens (the trainer numbers its alphabet in hash-map order: build_tokenizer renumbers)
    assert set(vocabulary(p for t in texts for p in shards.text_pieces(t))) == set(vocabulary(texts))


# -- audio ------------------------------------------------------------------------------------------

def test_audio_longer_than_max_samples_is_refused_from_its_header(tmp_path: Path) -> None:
    import soundfile

    from ssl_models.audio.config import AudioIngestConfig
    from ssl_models.audio.readers import read_audio_file
    from ssl_models.core.domain import Record
    from ssl_models.core.errors import UnreadableFileError
    from tests.ssl_models.test_audio_readers import tone

    soundfile.write(tmp_path / "long.wav", tone(3.0, 16000, channels=2), 16000)
    soundfile.write(tmp_path / "short.wav", tone(1.0, 16000, channels=2), 16000)
    options = AudioIngestConfig(max_samples=2 * 16000 * 2)
    with pytest.raises(UnreadableFileError) as caught:
        list(read_audio_file(tmp_path / "long.wav", "long.wav", options))
    assert caught.value.reason == ("audio too long: the header declares 48000 frames x 2 channels (96000 samples) "
                                   "over ingest.max_samples=64000")
    kept = list(read_audio_file(tmp_path / "short.wav", "short.wav", options))
    assert [type(r) for r in kept] == [Record] and kept[0].meta["seconds"] == 1.0


def test_a_file_of_many_channels_streams_in_blocks_of_bounded_size(tmp_path: Path, monkeypatch) -> None:
    """Blocks hold at most BLOCK_SAMPLES samples whatever the channel count; the mono mix is the same."""
    import soundfile

    from ssl_models.audio import readers

    rng = np.random.default_rng(4)
    soundfile.write(tmp_path / "array.wav", (rng.random((20000, 64), dtype=np.float32) - 0.5) * 0.5, 16000,
                    subtype="FLOAT")
    sizes: list[int] = []
    blocks = soundfile.SoundFile.blocks

    def recording(self, *args, **kwargs):
        for block in blocks(self, *args, **kwargs):
            sizes.append(block.size)
            yield block

    monkeypatch.setattr(readers, "BLOCK_SAMPLES", 64 * 1000)
    monkeypatch.setattr(soundfile.SoundFile, "blocks", recording)
    mono = np.concatenate(list(readers.stream_mono(tmp_path / "array.wav", 16000)))
    assert max(sizes) == 64 * 1000 and len(sizes) == 20
    expected = soundfile.read(tmp_path / "array.wav", dtype="float32")[0].mean(axis=1)
    assert np.allclose(mono, expected, atol=1e-7)


# -- whole stages -----------------------------------------------------------------------------------

def stage_peak(root: Path, stage: str, domain: str) -> tuple[int, str, float]:
    """Run `ssl-pipeline <stage> <domain>` under the issue's RLIMIT_AS from a wrapper process whose
    only child it is: (exit status, stderr, the stage's peak resident memory in MiB)."""
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, ({STAGE_LIMIT}, {STAGE_LIMIT}))
        done = subprocess.run([sys.executable, "-m", "tasks", "--root", {str(root)!r}, {stage!r}, {domain!r}],
                              preexec_fn=limit, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        sys.stderr.write(done.stderr)
        print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """)
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True,
                          env=stage_env(), timeout=600)
    code, peak = done.stdout.split()
    return int(code), done.stderr, float(peak)


def legal_bomb_corpus(corpus: Path) -> tuple[set[str], dict[str, str]]:
    for i in range(8):
        (corpus / f"ruling{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"ruling{i}.txt").write_text(f"Judgment {i}. The court finds that the supplier breached clause "
                                               f"{i}. The appeal is dismissed and costs follow the event.\n" * 3)
    long_line_text(corpus / "dump.txt")
    return {f"ruling{i}.txt" for i in range(8)}, {"dump.txt": "exceed ingest.max_characters=10000000"}


def histo_bomb_corpus(corpus: Path) -> tuple[set[str], dict[str, str]]:
    from tests.ssl_models.histo_files import ihc, save_png, save_pyramid_tiff

    for i in range(4):
        save_png(corpus / f"tile{i}.png", ihc(top=64 * i, left=32 * i, size=96))
    save_pyramid_tiff(corpus / "slide.tif", ihc(top=100, left=100, size=256))
    png_bomb(corpus / "bomb.png")
    tiled_tiff_bomb(corpus / "bomb.tif")
    return ({f"tile{i}.png" for i in range(4)} | {"slide.tif"},
            {"bomb.png": "exceeds ingest.max_pixels=268435456", "bomb.tif": "exceeds ingest.max_pixels=268435456"})


def medical_bomb_corpus(corpus: Path) -> tuple[set[str], dict[str, str]]:
    from tests.ssl_models.medical_files import blob_volume, write_nifti

    for i in range(3):
        write_nifti(corpus / f"good{i}.nii.gz", blob_volume(np.random.default_rng(i), 16, i % 2 == 0))
    gzip_nifti_bomb(corpus / "bomb4d.nii.gz")
    dicom_bomb(corpus / "frames.dcm")
    first = np.zeros((256, 256, 128), np.float32)
    first[64:192, 64:192, 32:96] = np.random.default_rng(5).random((128, 128, 64), dtype=np.float32) * 100 + 50
    sparse_4d_nifti(corpus / "fmri.nii", first, 32)
    return ({f"good{i}.nii.gz" for i in range(3)} | {"fmri.nii"},
            {"bomb4d.nii.gz": "over ingest.max_voxels=1073741824", "frames.dcm": "over ingest.max_voxels=1073741824"})


# the peak of each stage on these corpora with the default limits, in MiB (a stage that imports
# torch holds some 800 MiB of libraries before it reads a file; ingest imports it for no domain here)
STAGE_PEAK_MIB = {"legal": 700, "histo": 400, "medical": 400, "legal preprocess": 1500}
BOMB_CORPORA = {"legal": legal_bomb_corpus, "histo": histo_bomb_corpus, "medical": medical_bomb_corpus}


@pytest.mark.slow
@pytest.mark.parametrize("domain", sorted(BOMB_CORPORA))
def test_ingest_quarantines_every_bomb_under_the_stated_peak_and_keeps_the_good_files(tmp_path: Path,
                                                                                      domain: str) -> None:
    from tasks.io import read_jsonl
    from tests.faults.test_bad_inputs import DOMAINS

    good, bad = BOMB_CORPORA[domain](tmp_path / "corpus")
    block = DOMAINS[domain][1]()
    block["domains"][domain]["privacy"] = {"pseudonymise": False}
    write_params(tmp_path, block)
    code, stderr, peak = stage_peak(tmp_path, "ingest", domain)
    print(f"{domain} ingest: peak {peak:.0f} MiB")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    manifest_dir = tmp_path / "data" / domain / "manifest"
    reasons = {q["key"]: q["reason"] for q in read_jsonl(manifest_dir / "quarantine.jsonl")}
    assert reasons.keys() == bad.keys(), reasons
    for key, fragment in bad.items():
        assert fragment in reasons[key], reasons[key]
    assert {row["key"] for row in read_jsonl(manifest_dir / "manifest.jsonl")} == good
    assert peak < STAGE_PEAK_MIB[domain], peak
    if domain == "legal":  # preprocess reads what ingest accepted: never the 200 MB string
        code, stderr, peak = stage_peak(tmp_path, "preprocess", domain)
        print(f"{domain} preprocess: peak {peak:.0f} MiB")
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
        assert peak < STAGE_PEAK_MIB["legal preprocess"], peak  # torch and transformers are ~800 MiB of it
