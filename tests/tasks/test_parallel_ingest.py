"""Ingest and preprocess spread over local processes or a Dask cluster write the same bytes as one
process, in every domain (issue 23). Where a domain's preprocess has no per-source work to spread
(legal trains one tokenizer), its shards are compared all the same."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssl_models.core.hashing import sha256_file
from tasks.io import read_jsonl
from tasks.paths import DomainPaths
from tests.conftest import copy_project, reference_params, run_stages, tiny_params, write_params

DOMAINS = ["legal", "audio", "histo", "medical"]


@pytest.fixture(scope="module")
def dask_scheduler() -> Iterator[str]:
    """A Dask LocalCluster of 2 worker processes (one thread each), as a user's cluster would be."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def folder_digests(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in sorted(folder.rglob("*"))
            if path.is_file()}


def manifest_digests(root: Path, domain: str) -> dict[str, str]:
    return folder_digests(DomainPaths(domain, root).manifest)


def data_digests(root: Path, domain: str) -> dict[str, str]:
    paths = DomainPaths(domain, root)
    return {**{f"manifest/{k}": v for k, v in folder_digests(paths.manifest).items()},
            **{f"shards/{k}": v for k, v in folder_digests(paths.shards).items()}}


PER_SOURCE_PREPROCESS = {"histo", "medical", "audio"}  # the domains whose preprocess reads `workers`


def with_settings(domain: str, **settings: object) -> dict:
    params = reference_params(domain)
    sections = ["ingest"] + (["preprocess"] if domain in PER_SOURCE_PREPROCESS else [])
    for section in sections:
        params["domains"][domain].setdefault(section, {}).update(settings)
    return params


def run_again(source: Path, target: Path, domain: str, **settings: object) -> dict[str, str]:
    """`source`'s project (its default data and salt) ingested and preprocessed again in `target`
    with these settings."""
    copy_project(source, target)
    for folder in (DomainPaths(domain, target).manifest, DomainPaths(domain, target).shards):
        shutil.rmtree(folder)
    write_params(target, with_settings(domain, **settings))
    run_stages(target, domain, "ingest", "preprocess")
    return data_digests(target, domain)


@pytest.mark.parametrize("domain", DOMAINS)
def test_manifest_quarantine_and_shards_are_byte_identical_for_1_and_2_workers_and_dask(
        domain: str, tmp_path: Path, dask_scheduler: str, caplog: pytest.LogCaptureFixture) -> None:
    one = tmp_path / "one"
    one.mkdir()
    write_params(one, with_settings(domain, workers=1, chunk_size=2))
    run_stages(one, domain, "default_data", "ingest", "preprocess")
    expected = data_digests(one, domain)
    assert {"manifest/manifest.jsonl", "manifest/quarantine.jsonl", "shards/quarantine.jsonl"} <= set(expected)
    with caplog.at_level(logging.INFO):
        two = run_again(one, tmp_path / "two", domain, workers=2, chunk_size=2)
        on_dask = run_again(one, tmp_path / "dask", domain, workers=1, chunk_size=2, scheduler=dask_scheduler)
    engines = [r.getMessage() for r in caplog.records if " on " in r.getMessage()]
    stages = ["ingest"] + (["preprocess"] if domain in PER_SOURCE_PREPROCESS else [])
    for stage in stages:
        assert any(line.startswith(stage) and "on 2 local process(es)" in line for line in engines), engines
        assert any(line.startswith(stage) and f"on Dask scheduler {dask_scheduler}" in line for line in engines), engines
    assert two == expected
    assert on_dask == expected
    for stage in ("ingest", "preprocess"):  # the chunks are gone once the output is in place
        assert not DomainPaths(domain, tmp_path / "two").work(stage).exists()


def square_all(job: list[int]) -> dict:
    return {"squares": [n * n for n in job], "raw": bytes(job)}


def test_chunk_results_come_back_in_order_and_one_cut_short_is_done_again(tmp_path: Path) -> None:
    from tasks.workers import ChunkedWork

    chunks, names = [[1, 2], [3], [4, 5, 6]], ["a", "b", "c"]
    work = ChunkedWork(tmp_path / "work", {"setting": 1}, workers=2)
    first = list(work.results_of(square_all, zip(chunks, names)))
    assert first == [{"squares": [1, 4], "raw": b"\x01\x02"}, {"squares": [9], "raw": b"\x03"},
                     {"squares": [16, 25, 36], "raw": b"\x04\x05\x06"}]
    files = sorted((tmp_path / "work").iterdir())
    assert len(files) == 3
    files[1].write_bytes(files[1].read_bytes()[:-2])  # a write a power cut left short
    again = ChunkedWork(tmp_path / "work", {"setting": 1}, workers=1)
    assert list(again.results_of(square_all, zip(chunks, names))) == first
    assert again.resumed == 2  # the one cut short was done again
    other = ChunkedWork(tmp_path / "work", {"setting": 2}, workers=1)  # other settings: nothing taken over
    assert list(other.results_of(square_all, zip(chunks, names))) == first and other.resumed == 0


def test_a_kept_chunk_is_done_again_when_one_of_its_files_changed_since(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A chunk's identity names its files only (no `stat` a file in the stage's process): what each
    file was when read travels in the chunk's result, and a re-run reading it back checks it."""
    import json
    import os

    from tasks.workers import ChunkedWork

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc-{i}.txt").write_text(f"Agreement {i}. The lessee shall pay {i * 7} euros by day {i}.\n")
    write_params(tmp_path, tiny_params(corpus="corpus", labels=None, ingest={"workers": 1, "chunk_size": 2}))
    monkeypatch.setattr(ChunkedWork, "finish", lambda self: None)  # its chunks stay, as a killed run leaves them
    run_stages(tmp_path, "legal", "ingest")
    edited = corpus / "doc-3.txt"
    before = edited.stat()
    edited.write_text(edited.read_text().replace("Agreement", "Agreemant"))  # the same size
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    with caplog.at_level(logging.INFO):
        run_stages(tmp_path, "legal", "ingest")
    assert "resuming: 2 of 3 chunks" in caplog.text and "inputs changed since" in caplog.text
    rows = [json.loads(line) for line in (DomainPaths("legal", tmp_path).manifest / "manifest.jsonl").open()]
    assert {row["key"]: row["sha256"] for row in rows}["doc-3.txt"] == sha256_file(edited)


def test_auto_workers_stay_in_the_stage_for_a_small_corpus_and_a_number_is_always_used(tmp_path: Path) -> None:
    from tasks.workers import AUTO_MIN_ITEMS, ChunkedWork

    auto = ChunkedWork(tmp_path, {}, workers="auto")
    auto.chunk_length(AUTO_MIN_ITEMS - 1)
    assert not auto.worth_processes() and auto.engine == "this process"
    auto.chunk_length(AUTO_MIN_ITEMS)
    assert auto.worth_processes()
    chosen = ChunkedWork(tmp_path, {}, workers=2)
    chosen.chunk_length(3)
    assert chosen.engine == "2 local process(es)"


def test_dicom_headers_are_read_on_the_engine_and_the_manifest_is_the_same(
        tmp_path: Path, dask_scheduler: str, caplog: pytest.LogCaptureFixture) -> None:
    """A PACS export is hundreds of thousands of DICOM files, whose headers must all be read to
    group them into series: that reading runs on the stage's engine like the rest of ingest (its
    chunks kept apart, and gone once the manifest is in place), and the manifest, quarantine list
    and duplicates are byte-identical for 1 worker, 2 workers and Dask. The corpus: three series
    (one split over two folders, one with a header-only file), a lone slice (not a volume), and a
    `.dcm` that is no DICOM."""
    from tests.ssl_models.medical_files import medical_params, write_series, write_without_pixels

    corpus = tmp_path / "corpus"
    for number in range(3):
        write_series(corpus / f"patient{number}" / "ct", f"Doe^P{number}", f"PID-{number}", n_slices=8,
                     contrast=100.0 * number)
    moved = sorted((corpus / "patient2" / "ct").iterdir())[:4]
    (corpus / "patient2" / "more").mkdir()
    for path in moved:
        path.rename(corpus / "patient2" / "more" / path.name)
    write_without_pixels(corpus / "patient1" / "ct" / "report.dcm")
    write_series(corpus / "lone", "Doe^L", "PID-9", n_slices=1)
    (corpus / "broken.dcm").write_bytes(b"not a dicom file at all" * 10)
    made = {}
    for name, settings in (("one", {"workers": 1}), ("two", {"workers": 2}),
                           ("dask", {"workers": 1, "scheduler": dask_scheduler})):
        root = tmp_path / name
        if name == "one":
            root.mkdir()
        else:  # the same secret salt, so the same pseudonyms
            shutil.copytree(tmp_path / "one" / "secret", root / "secret")
        write_params(root, medical_params(corpus=str(corpus), labels=None,
                                          ingest={**settings, "chunk_size": 2, "max_quarantined_fraction": 0.9}))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            run_stages(root, "medical", "ingest")
        lines = [r.getMessage() for r in caplog.records]
        engine = "2 local process(es)" if name == "two" else f"Dask scheduler {dask_scheduler}" if name == "dask" \
            else "this process"
        assert any(line.startswith("ingest medical (dicom-headers): 14 chunk(s) on " + engine) for line in lines), lines
        assert not DomainPaths("medical", root).work("ingest-dicom-headers").exists()
        made[name] = manifest_digests(root, "medical")
    assert made["one"] == made["two"] == made["dask"]
    rows = (tmp_path / "one/data/medical/manifest/manifest.jsonl").read_text().splitlines()
    reasons = sorted(entry["reason"].split(" (")[0].split(":")[0] for entry in
                     read_jsonl(tmp_path / "one/data/medical/manifest/quarantine.jsonl"))
    assert len(rows) == 3 and reasons == ["DICOM without pixel data", "not a 3D volume", "not a DICOM file"], reasons


def young_threshold(job: list[int]) -> list[int]:
    import gc

    return [gc.get_threshold()[0] for _ in job]


def test_ingest_and_local_workers_collect_garbage_less_often(tmp_path: Path, monkeypatch) -> None:
    """`collect_less`: the stage's process while ingest runs (set back after it: tests run many stages
    in one process), and a local worker for its life. Preprocess is in the same `DATA_STAGES`; an
    empty project cannot start it (its inputs are checked first), so it is not run here."""
    import gc

    import tasks.stages.ingest as ingest_module
    from ssl_models.core.processes import YOUNG_COLLECTION_EVERY
    from tasks.cli import run_stage
    from tasks.workers import ChunkedWork

    before = gc.get_threshold()
    assert before[0] < YOUNG_COLLECTION_EVERY
    seen: list[int] = []
    monkeypatch.setattr(ingest_module, "ingest", lambda cfg, domain, paths: seen.append(gc.get_threshold()[0]))
    (tmp_path / "corpus").mkdir()
    write_params(tmp_path, tiny_params(corpus="corpus", labels=None))
    run_stage("ingest", "legal", tmp_path)
    assert seen == [YOUNG_COLLECTION_EVERY] and gc.get_threshold() == before
    work = ChunkedWork(tmp_path / "work", {}, workers=2)
    assert list(work.results_of(young_threshold, zip([[1], [2]], ["a", "b"]))) == [[YOUNG_COLLECTION_EVERY]] * 2


def test_auto_chunks_are_small_for_a_list_and_the_domains_size_for_a_long_stream(tmp_path: Path) -> None:
    """The stage ends with its last chunk: a corpus known whole comes in CHUNKS_PER_WORKER chunks a
    worker (384 DICOM series on 2 workers: 32 chunks of 12, not 8 of 48); the first LOOKAHEAD items of
    a longer stream in 4 a worker, so short texts keep the domain's 1,024 a chunk."""
    from ssl_models.core.workers import LOOKAHEAD
    from tasks.workers import CHUNKS_PER_WORKER, ChunkedWork

    listed = ChunkedWork(tmp_path, {}, workers=2, max_items=64)
    assert listed.chunk_length(384) == -(-384 // (2 * CHUNKS_PER_WORKER)) and listed.chunks_expected() == 32
    streamed = ChunkedWork(tmp_path, {}, workers=2, max_items=1024)
    assert streamed.chunk_length(LOOKAHEAD, whole=False) == 1024
    assert streamed.chunk_length(LOOKAHEAD - 1) == -(-(LOOKAHEAD - 1) // (2 * CHUNKS_PER_WORKER))
