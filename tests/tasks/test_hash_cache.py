"""A stage checks its inputs against the digests recorded when they were written without reading
them again while they are untouched (issue 23), and still catches one changed since."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ssl_models.core import hashing
from ssl_models.core.hashing import file_sha256, hash_cache, sha256_file
from tasks.cli import check_inputs
from tasks.lineage import check_raw_inputs_unchanged
from tasks.paths import DomainPaths
from tests.conftest import run_stages


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose bytes are read for a digest from now on."""
    seen: list[Path] = []

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        seen.append(Path(path))
        return sha256_file(path, chunk)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return seen


def test_an_untouched_file_is_not_read_again_and_a_rewritten_one_is(tmp_path: Path, reads: list[Path]) -> None:
    data = tmp_path / "shard.arrow"
    data.write_bytes(b"x" * 1000)
    time.sleep(0.15)  # older than the racy window: its stamp can vouch for its digest
    with hash_cache(tmp_path / "hashes.sqlite"):
        first = file_sha256(data)
    with hash_cache(tmp_path / "hashes.sqlite"):
        assert file_sha256(data) == first
    assert reads == [data]
    stat = os.stat(data)
    data.write_bytes(b"y" * 1000)  # same size, modification time put back: the change time still moves
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with hash_cache(tmp_path / "hashes.sqlite"):
        assert file_sha256(data) != first
    assert reads == [data, data]


def test_a_file_written_just_before_it_was_hashed_is_read_again_next_time(tmp_path: Path, reads: list[Path]) -> None:
    """File times tick coarsely: a write in the same tick after the read could leave the same stamp."""
    data = tmp_path / "fresh.bin"
    data.write_bytes(b"z" * 10)
    with hash_cache(tmp_path / "hashes.sqlite"):
        file_sha256(data)
        file_sha256(data)
    assert len(reads) == 2


def test_a_stage_start_reads_neither_its_inputs_nor_the_raw_corpus_again(tiny_project: Path,
                                                                         reads: list[Path]) -> None:
    run_stages(tiny_project, "legal", "default_data")
    time.sleep(0.15)  # the corpus was written just now: settled first, as a user's corpus is
    run_stages(tiny_project, "legal", "ingest", "preprocess")
    paths = DomainPaths("legal", tiny_project)
    time.sleep(0.15)
    with hash_cache(paths.workspace / "hashes.sqlite"):  # outputs written just before their record: once more
        check_inputs("pretrain", paths)
    reads.clear()
    with hash_cache(paths.workspace / "hashes.sqlite"):
        check_inputs("pretrain", paths)
        check_raw_inputs_unchanged(paths.manifest, tiny_project, "ingest@legal")
    assert reads == []
    shard = next(paths.shards.rglob("*.arrow"))
    with open(shard, "r+b") as handle:  # one byte changed in place by a program
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    with hash_cache(paths.workspace / "hashes.sqlite"), pytest.raises(Exception, match="content changed"):
        check_inputs("pretrain", paths)
    assert reads == [shard]


def test_a_damaged_cache_file_is_rebuilt_and_trusts_nothing_from_before(tmp_path: Path, reads: list[Path]) -> None:
    data = tmp_path / "shard.arrow"
    data.write_bytes(b"x" * 100)
    (tmp_path / "hashes.sqlite").write_bytes(b"not a database at all" * 100)
    with hash_cache(tmp_path / "hashes.sqlite"):
        assert file_sha256(data) == sha256_file(data)
    assert reads == [data]
    assert (tmp_path / "hashes.sqlite").stat().st_mode & 0o077 == 0


def test_ingest_reads_a_slide_once_for_its_hash(tmp_path: Path, reads: list[Path]) -> None:
    """A slide's record carries its file's sha256, which ingest has just taken of the raw file: the
    histopathology reader takes it from there instead of reading the slide a second time."""
    from tests.conftest import write_params
    from tests.ssl_models.histo_files import histo_params, ihc, save_png

    slides = [save_png(tmp_path / "slides" / f"slide-{i}.png", ihc(top=16 * i, size=128)) for i in range(3)]
    write_params(tmp_path, histo_params(corpus="slides", labels=None, ingest={"workers": 1}))
    (summary,) = run_stages(tmp_path, "histo", "ingest")
    assert summary["records"] == 3
    assert sorted(path.name for path in reads if path.suffix == ".png") == sorted(p.name for p in slides)


def test_ingest_opens_each_legal_text_once_for_its_hash_and_its_text(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A text is read whole once by ingest: its digest and the reader's text come from the same bytes
    (before, ingest streamed it through the hash and the reader read it again). A text over the
    domain's `reads_taken_bytes` is still read by the reader itself, and both give one record."""
    import builtins
    import pathlib

    from ssl_models.legal_text import LegalText
    from tests.conftest import write_params

    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc-{i}.txt").write_text(f"Clause {i}: the parties agree to the terms set out below. " * 4)
    (corpus / "long.txt").write_text("A long agreement between the parties, binding on both. " * 40)
    monkeypatch.setattr(LegalText, "reads_taken_bytes", 1000)  # long.txt is over it, the others under
    opened: list[str] = []
    real_open, real_read_bytes = builtins.open, pathlib.Path.read_bytes

    def counting_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(corpus)) and "b" in mode:
            opened.append(Path(file).name)
        return real_open(file, mode, *args, **kwargs)

    def counting_read_bytes(self: Path) -> bytes:
        if str(self).startswith(str(corpus)):
            opened.append(self.name)
        return real_read_bytes(self)

    monkeypatch.setattr(hashing, "open", counting_open, raising=False)  # the digest's read
    monkeypatch.setattr(pathlib.Path, "read_bytes", counting_read_bytes)  # the reader's own read
    write_params(tmp_path, {"domains": {"legal": {"module": "legal_text", "corpus": "texts", "labels": None,
                                                  "ingest": {"workers": 1, "min_characters": 10}}}})
    (summary,) = run_stages(tmp_path, "legal", "ingest")
    assert summary["records"] == 5
    assert sorted(opened) == sorted([f"doc-{i}.txt" for i in range(4)] + ["long.txt", "long.txt"])
    rows = [json.loads(line) for line in (tmp_path / "data/legal/manifest/manifest.jsonl").read_text().splitlines()]
    assert {row["key"]: row["sha256"] for row in rows} == {
        path.name: sha256_file(path) for path in corpus.iterdir()}


def _idat_recompressed_badly(path: Path) -> None:
    """Break a PNG's compressed pixels behind valid chunk CRCs: every chunk whole and checked, the
    image still not decodable (what a CRC check cannot see)."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    body = bytearray(data[at + 8:at + 8 + length])
    body[2:] = b"\xff" * (len(body) - 2)  # the zlib header kept, the deflate stream garbage
    data[at + 8:at + 8 + length] = body
    data[at + 8 + length:at + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
    path.write_bytes(bytes(data))


def test_ingest_checks_a_png_tile_without_decoding_it_and_tiling_quarantines_what_does_not_decode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest reads a PNG's chunks against their CRCs and its header against ingest.max_pixels, and
    decodes no pixel (tiling decodes each tile once). A bit flipped in the pixels' chunk is caught
    there; compressed data broken behind valid CRCs passes ingest and is quarantined by preprocess,
    with its reason."""
    from PIL import ImageFile

    from tests.conftest import write_params
    from tests.ssl_models.histo_files import histo_params, ihc, save_png

    slides = [save_png(tmp_path / "slides" / f"slide-{i}.png", ihc(top=8 * i, size=128)) for i in range(8)]
    flipped = slides[6].read_bytes()
    at = flipped.index(b"IDAT") + 40
    slides[6].write_bytes(flipped[:at] + bytes([flipped[at] ^ 1]) + flipped[at + 1:])
    _idat_recompressed_badly(slides[7])
    write_params(tmp_path, histo_params(corpus="slides", labels=None, ingest={"workers": 1},
                                        preprocess={"workers": 1}, privacy={"pseudonymise": False}))
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load  # what a PNG's pixels are decoded by

    def counting_load(self):
        decoded.append(Path(getattr(self, "filename", "") or "").name)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    (summary,) = run_stages(tmp_path, "histo", "ingest")
    assert summary["records"] == 7 and summary["quarantined"] == 1
    assert decoded == []
    quarantine = [json.loads(line) for line in (tmp_path / "data/histo/manifest/quarantine.jsonl").open()]
    assert [q["key"] for q in quarantine] == ["slide-6.png"] and "cannot decode image" in quarantine[0]["reason"]
    (summary,) = run_stages(tmp_path, "histo", "preprocess")
    assert summary["quarantined"] == 1
    assert sorted(set(decoded)) == sorted(path.name for path in slides[:6] + slides[7:])  # tiling decodes them
    later = [json.loads(line) for line in (tmp_path / "data/histo/shards/quarantine.jsonl").open()]
    assert [q["key"] for q in later] == ["slide-7.png"] and later[0]["reason"]
