"""Bad files of every kind in every domain, through the CLI as a nightly run calls it.

Each domain gets a corpus of good files mixed with empty files, truncated headers and bodies,
garbage under a valid extension, a huge (sparse) file and the domain's own faults (DICOM without
pixels, all-NaN and constant volumes, a slide whose full-resolution level does not decode, text
with NUL bytes or in an unexpected encoding, zero-sample audio). `ingest` and `preprocess` run in
a process of their own (tests/stage_processes.py): both must exit 0 with no traceback, every bad
file must be quarantined with a reason that says what is wrong, every good file must be in the
manifest, and where the domain pseudonymises no file name (nor a planted patient name) may reach
an output or the console.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from ssl_models.core.privacy import pseudonymiser
from ssl_models.legal_text.readers import MAX_TEXT_BYTES
from tasks.io import read_json, read_jsonl
from tests.conftest import tiny_params, write_params
from tests.stage_processes import StageProcesses

RNG_SEED = 7
HUGE_BYTES = MAX_TEXT_BYTES + 2 ** 20  # a sparse file: this many bytes on paper, none on disk
PERMISSIVE = {"max_quarantined_fraction": 0.9}  # most of each corpus is bad on purpose


@dataclass
class Corpus:
    """What a builder laid out: the good sources (keys) and the bad ones with a reason fragment."""

    good: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)  # key -> fragment its reason must hold
    failing_preprocess: dict[str, str] = field(default_factory=dict)  # in the manifest, quarantined later
    secrets: tuple[str, ...] = ()  # strings that must not reach any output (names in files and headers)


def sparse(path: Path, size: int = HUGE_BYTES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def garbage(path: Path, size: int = 3000, seed: int = RNG_SEED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def legal_corpus(root: Path) -> Corpus:
    corpus, made = root / "corpus", Corpus()
    (corpus / "docs").mkdir(parents=True)
    for i in range(16):
        (corpus / "docs" / f"ruling{i}.txt").write_text(
            f"Judgment {i}. The court finds that the supplier breached clause {i} of the agreement. "
            f"The appeal is {'dismissed' if i % 2 else 'allowed'} and costs follow the event.\n" * 3)
        made.good.add(f"docs/ruling{i}.txt")
    (corpus / "docs" / "page.html").write_text("<html><body><p>The tenant shall pay the rent.</p></body></html>")
    french = "Le présent contrat est conclu entre les parties; le licencié s'engage à régler les redevances."
    (corpus / "docs" / "cp1252.txt").write_bytes(french.encode("cp1252"))
    (corpus / "docs" / "utf16_no_bom.txt").write_bytes("The lessee waives the right of set-off.".encode("utf-16-le"))
    made.good |= {"docs/page.html", "docs/cp1252.txt", "docs/utf16_no_bom.txt"}
    (corpus / "records.jsonl").write_text("\n".join([
        json.dumps({"text": "A clause in a record."}), json.dumps({"text": "Another clause entirely."}),
        "{broken", json.dumps({"text": "binary\u0000inside"})]) + "\n")
    made.good |= {"records.jsonl#L1", "records.jsonl#L2"}
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "blank.txt").write_bytes(b" \n\t\n")
    (corpus / "nul_inside.txt").write_bytes(b"A long recital of the facts. " * 400 + b"\x00\x00" + b"The end.")
    garbage(corpus / "garbage.txt")
    sparse(corpus / "huge.txt")
    garbage(corpus / "photo.png", 100)
    made.bad = {"empty.txt": "empty file", "blank.txt": "empty file", "nul_inside.txt": "binary content",
                "garbage.txt": "binary content", "huge.txt": "file too large", "photo.png": "unsupported file type",
                "records.jsonl#L3": "invalid JSON", "records.jsonl#L4": "NUL characters"}
    return made


def medical_corpus(root: Path) -> Corpus:
    import nibabel as nib
    import pydicom

    from tests.ssl_models.medical_files import blob_volume, write_nifti, write_series, write_without_pixels

    corpus, made = root / "corpus", Corpus(secrets=("DOE", "Doe", "SMITH", "Smith", "Planted"))
    write_series(corpus / "DOE_JANE" / "ct", "Doe^Jane", "DOE-1", n_slices=10)
    slices = write_series(corpus / "SMITH_JOHN" / "ct", "Smith^John", "SMITH-2", n_slices=9, contrast=300)
    copy = pydicom.dcmread(slices[3])  # a header-only copy of one slice beside it, as some exports leave
    del copy.PixelData
    copy.save_as(corpus / "SMITH_JOHN" / "ct" / "SMITH_copy.dcm", enforce_file_format=True)
    made.good |= {"DOE_JANE/ct", "SMITH_JOHN/ct"}
    for i, name in enumerate(("DOE_t1.nii.gz", "SMITH_t2.nii", "DOE_flair.nii.gz")):
        write_nifti(corpus / name, blob_volume(np.random.default_rng(i), 16, i % 2 == 0))
        made.good.add(name)
    (corpus / "DOE_empty.nii.gz").write_bytes(b"")
    write_nifti(corpus / "DOE_cut.nii.gz", blob_volume(np.random.default_rng(9), 16, True))
    (corpus / "DOE_cut.nii.gz").write_bytes((corpus / "DOE_cut.nii.gz").read_bytes()[:300])  # body cut short
    write_nifti(corpus / "DOE_header_cut.nii", blob_volume(np.random.default_rng(9), 16, True))
    (corpus / "DOE_header_cut.nii").write_bytes((corpus / "DOE_header_cut.nii").read_bytes()[:100])
    garbage(corpus / "DOE_garbage.nii")
    write_nifti(corpus / "DOE_nan.nii", np.full((12, 12, 12), np.nan))
    write_nifti(corpus / "DOE_constant.nii", np.full((12, 12, 12), 7.0))
    write_nifti(corpus / "DOE_slice.nii", np.random.default_rng(3).random((32, 32, 1)))
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    image.header.set_data_shape((2048, 2048, 2048))
    (corpus / "DOE_declares_32GiB.nii").write_bytes(image.header.binaryblock + b"\0" * 400)
    sparse(corpus / "DOE_huge.nii")
    write_without_pixels(corpus / "DOE_header_only.dcm")
    garbage(corpus / "DOE_random.dcm")
    (corpus / "DOE_empty.dcm").write_bytes(b"")
    made.bad = {"DOE_empty.nii.gz": "empty file", "DOE_cut.nii.gz": "truncated or corrupt NIfTI",
                "DOE_header_cut.nii": "truncated or corrupt NIfTI header",
                "DOE_garbage.nii": "truncated or corrupt NIfTI header", "DOE_nan.nii": "no finite voxel",
                "DOE_constant.nii": "single intensity value", "DOE_slice.nii": "not a 3D volume",
                "DOE_declares_32GiB.nii": "volume too large", "DOE_huge.nii": "truncated or corrupt NIfTI header",
                "DOE_header_only.dcm": "DICOM without pixel data",
                "SMITH_JOHN/ct/SMITH_copy.dcm": "DICOM without pixel data (the rest of its series is kept)",
                "DOE_random.dcm": "not a DICOM file", "DOE_empty.dcm": "empty file"}
    return made


def histo_corpus(root: Path) -> Corpus:
    import tifffile
    from PIL import Image

    from tests.ssl_models.histo_files import ihc, save_png, save_pyramid_tiff

    corpus, made = root / "corpus", Corpus(secrets=("ACC-",))
    for i in range(6):
        save_png(corpus / "ACC-0001" / f"tile{i}.png", ihc(top=64 * i, left=32 * i, size=96))
        made.good.add(f"ACC-0001/tile{i}.png")
    save_pyramid_tiff(corpus / "ACC-0002 slide.tif", ihc(top=100, left=100, size=256))
    made.good.add("ACC-0002 slide.tif")
    # full resolution corrupt, the small level intact: ingest's thumbnail decodes, tiling does not
    broken = corpus / "ACC-0003 level0.tif"
    pixels = ihc(top=300, left=200, size=256)
    with tifffile.TiffWriter(broken) as tif:
        tif.write(pixels, tile=(64, 64), photometric="rgb", compression="zlib")
        tif.write(np.asarray(Image.fromarray(pixels).resize((128, 128))), tile=(64, 64), subfiletype=1,
                  photometric="rgb", compression="zlib")
    with tifffile.TiffFile(broken) as tif:
        spans = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    data = bytearray(broken.read_bytes())
    for offset, count in spans:
        data[offset + 2:offset + count] = b"\xff" * (count - 2)
    broken.write_bytes(bytes(data))
    made.good.add("ACC-0003 level0.tif")
    made.failing_preprocess = {"ACC-0003 level0.tif": "tiling failed"}
    (corpus / "ACC-9001 empty.png").write_bytes(b"")
    cut = save_png(corpus / "ACC-9002 cut.png", ihc(size=64))
    cut.write_bytes(cut.read_bytes()[:200])
    header_cut = save_png(corpus / "ACC-9003 header.png", ihc(size=64))
    header_cut.write_bytes(header_cut.read_bytes()[:12])
    garbage(corpus / "ACC-9004 garbage.svs")
    garbage(corpus / "ACC-9005 garbage.png")
    save_png(corpus / "ACC-9006 tiny.png", ihc(size=4))
    sparse(corpus / "ACC-9007 huge.svs")
    made.bad = {"ACC-9001 empty.png": "empty file", "ACC-9002 cut.png": "cannot decode image",
                "ACC-9003 header.png": "cannot decode image", "ACC-9004 garbage.svs": "cannot open slide",
                "ACC-9005 garbage.png": "cannot decode image", "ACC-9006 tiny.png": "image too small",
                "ACC-9007 huge.svs": "cannot open slide"}
    return made


def audio_corpus(root: Path) -> Corpus:
    import soundfile

    from tests.ssl_models.test_audio_readers import tone, write_bad_files

    corpus, made = root / "corpus", Corpus()
    for i in range(5):
        (corpus / "spk1").mkdir(parents=True, exist_ok=True)
        soundfile.write(corpus / "spk1" / f"tone{i}.wav", tone(1.0, 8000, 300.0 + 110 * i), 8000)
        made.good.add(f"spk1/tone{i}.wav")
    (corpus / "spk2").mkdir()
    soundfile.write(corpus / "spk2" / "tone.flac", tone(1.5, 16000, 520.0), 16000)
    made.good.add("spk2/tone.flac")
    made.bad = {f"bad/{name}": fragment for name, fragment in write_bad_files(corpus / "bad").items()}
    soundfile.write(corpus / "bad" / "whole.wav", tone(1.0, 8000), 8000)
    (corpus / "bad" / "header_cut.wav").write_bytes((corpus / "bad" / "whole.wav").read_bytes()[:20])
    (corpus / "bad" / "whole.wav").unlink()
    garbage(corpus / "bad" / "garbage.wav")
    sparse(corpus / "bad" / "huge.wav")
    made.bad |= {"bad/header_cut.wav": "undecodable audio", "bad/garbage.wav": "undecodable audio",
                 "bad/huge.wav": "undecodable audio"}
    return made


def legal_params() -> dict:
    return tiny_params(corpus="corpus", labels=None, ingest=PERMISSIVE)


def medical_params() -> dict:
    from tests.ssl_models.medical_files import medical_params as params

    return params(ingest=PERMISSIVE)


def histo_params() -> dict:
    from tests.ssl_models.histo_files import histo_params as params

    return params(corpus="corpus", labels=None, ingest=PERMISSIVE)


def audio_params() -> dict:
    from tests.ssl_models.test_audio_pipeline import audio_params as params

    return params(corpus="corpus", labels=None, ingest=PERMISSIVE)


DOMAINS: dict[str, tuple[Callable[[Path], Corpus], Callable[[], dict]]] = {
    "legal": (legal_corpus, legal_params), "medical": (medical_corpus, medical_params),
    "histo": (histo_corpus, histo_params), "audio": (audio_corpus, audio_params)}


def run_cli(processes: StageProcesses, root: Path, stage: str, domain: str) -> subprocess.CompletedProcess:
    """The stage command in a process of its own (forked after the imports: tests/stage_processes.py)."""
    code, stderr, _ = processes.run(root, stage, domain)
    return subprocess.CompletedProcess([stage, domain], code, "", stderr)


def written_text(folder: Path) -> str:
    """Every JSON / JSONL / text file of an artifact folder (not the Arrow tables of pixels)."""
    return "".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*"))
                   if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".md", ".csv"))


@pytest.mark.slow
@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_bad_files_are_quarantined_with_a_reason_and_the_run_completes(tmp_path: Path, domain: str,
                                                                      stage_processes: StageProcesses) -> None:
    build, params = DOMAINS[domain]
    made = build(tmp_path)
    block = params()
    write_params(tmp_path, block)
    ingest = run_cli(stage_processes, tmp_path, "ingest", domain)
    assert ingest.returncode == 0 and "Traceback" not in ingest.stderr, ingest.stderr[-3000:]
    manifest_dir = tmp_path / "data" / domain / "manifest"
    summary = read_json(manifest_dir / "summary.json")
    if summary["pseudonymised"]:
        salt = block["domains"][domain].get("privacy", {}).get("salt_file", ".secrets/pseudonym-salt")
        public = pseudonymiser(tmp_path / salt, create=False)
    else:
        def public(kind: str, value: str) -> str:
            return value
    assert summary["pseudonymised"] == (domain in ("medical", "histo"))  # slides and DICOM by default
    reasons = {q["key"]: q["reason"] for q in read_jsonl(manifest_dir / "quarantine.jsonl")}
    for key, fragment in made.bad.items():
        assert public("key", key) in reasons, (key, sorted(reasons.values()))
        assert fragment in reasons[public("key", key)], (key, reasons[public("key", key)])
    assert len(reasons) == len(made.bad), sorted(reasons.values())  # no good file quarantined
    manifest = read_jsonl(manifest_dir / "manifest.jsonl")
    assert {row["key"] for row in manifest} == {public("key", key) for key in made.good}
    names = {Path(key.split("#")[0]).name for key in [*made.good, *made.bad]}  # with their suffix
    for reason in reasons.values():  # a reason says what is wrong, never which file
        assert not any(name in reason for name in names) and str(tmp_path) not in reason, reason

    preprocess = run_cli(stage_processes, tmp_path, "preprocess", domain)
    assert preprocess.returncode == 0 and "Traceback" not in preprocess.stderr, preprocess.stderr[-3000:]
    shards_dir = tmp_path / "data" / domain / "shards"
    later = {q["key"]: q["reason"] for q in read_jsonl(shards_dir / "quarantine.jsonl")}
    assert later.keys() == {public("key", key) for key in made.failing_preprocess}
    for key, fragment in made.failing_preprocess.items():
        assert fragment in later[public("key", key)]
    assert read_json(shards_dir / "summary.json")["quarantined"] == len(made.failing_preprocess)

    if summary["pseudonymised"]:
        outputs = written_text(manifest_dir) + written_text(shards_dir) + ingest.stderr + preprocess.stderr
        for name in {*made.secrets, *(n for n in names if len(n) > 4)}:
            assert name not in outputs, name
