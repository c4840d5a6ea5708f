"""SIGKILL part-way through a chunked ingest (and a chunked tiling): the re-run reads back the
chunks finished before the kill, does the rest, and ends bit-identical to an uninterrupted run
(issue 23). The stage runs as the CLI runs it, in a process of its own (tests/stage_processes.py),
with its work spread over 2 local processes: the kill takes them too."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tasks.paths import DomainPaths
from tests.conftest import run_stages, tiny_params, wait_for, write_params
from tests.faults.test_kills import SALT, leftovers
from tests.stage_processes import StageProcesses
from tests.tasks.test_parallel_ingest import manifest_digests

pytestmark = pytest.mark.slow

FILES = 600


def text_project(root: Path) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(FILES):
        (corpus / f"doc-{i:04d}.txt").write_text(f"Agreement {i}. The lessee shall pay {i * 7} euros by day {i % 28}.\n")
    write_params(root, tiny_params(corpus="corpus", labels=None, ingest={"workers": 2, "chunk_size": 1}))
    return root


def chunks_done(root: Path, stage: str, domain: str) -> int:
    folder = DomainPaths(domain, root).work(stage)
    return sum(1 for path in folder.glob("*.chunk")) if folder.is_dir() else 0


def test_a_killed_chunked_ingest_resumes_at_its_first_unfinished_chunk(tmp_path: Path,
                                                                        stage_processes: StageProcesses) -> None:
    whole = text_project(tmp_path / "whole")
    run_stages(whole, "legal", "ingest")
    killed = text_project(tmp_path / "killed")
    process = stage_processes.start(killed, "ingest", "legal")
    wait_for("a tenth of ingest's chunks", lambda: chunks_done(killed, "ingest", "legal") >= FILES // 10
             or process.wait(0) is not None, timeout=300, every=0.02)
    process.kill()
    finished = chunks_done(killed, "ingest", "legal")
    assert FILES // 10 <= finished < FILES, "the kill did not land mid-way: make the corpus larger"
    assert not DomainPaths("legal", killed).manifest.exists()
    code, stderr, _ = stage_processes.run(killed, "ingest", "legal")
    assert code == 0, stderr[-3000:]
    resumed = re.search(r"resuming: (\d+) of (\d+) chunks", stderr)
    assert resumed and int(resumed.group(1)) >= finished and int(resumed.group(2)) == FILES, stderr[-3000:]
    assert manifest_digests(killed, "legal") == manifest_digests(whole, "legal")
    assert not DomainPaths("legal", killed).work("ingest").exists()
    assert leftovers(killed) == []


SLIDES = 120


def slide_project(root: Path, like: Path | None = None) -> Path:
    """SLIDES crops of the real IHC image as PNG slides, unlabeled, tiled one slide a chunk on 2
    processes; ingested with `like`'s pseudonym salt when given (the same keys)."""
    from tests.ssl_models.histo_files import histo_params, ihc, save_png

    if like is not None:
        (root / SALT).parent.mkdir(parents=True)
        shutil.copy2(like / SALT, root / SALT)
    for i in range(SLIDES):
        save_png(root / "slides" / f"slide-{i:03d}.png", ihc(top=(i * 37) % 384, left=(i * 53) % 384, size=128))
    write_params(root, histo_params(corpus="slides", labels=None, preprocess={"workers": 2, "chunk_size": 1}))
    run_stages(root, "histo", "ingest")
    return root


def test_a_killed_chunked_tiling_resumes_at_its_first_unfinished_chunk(tmp_path: Path,
                                                                        stage_processes: StageProcesses) -> None:
    from tests.tasks.test_parallel_ingest import folder_digests

    whole = slide_project(tmp_path / "whole")
    run_stages(whole, "histo", "preprocess")
    killed = slide_project(tmp_path / "killed", like=whole)
    process = stage_processes.start(killed, "preprocess", "histo")
    wait_for("a tenth of the slides tiled", lambda: chunks_done(killed, "preprocess", "histo") >= SLIDES // 10
             or process.wait(0) is not None, timeout=300, every=0.02)
    process.kill()
    finished = chunks_done(killed, "preprocess", "histo")
    assert SLIDES // 10 <= finished < SLIDES, "the kill did not land mid-way: tile more slides"
    code, stderr, _ = stage_processes.run(killed, "preprocess", "histo")
    assert code == 0, stderr[-3000:]
    resumed = re.search(r"resuming: (\d+) of (\d+) chunks", stderr)
    assert resumed and int(resumed.group(1)) >= finished and int(resumed.group(2)) == SLIDES, stderr[-3000:]
    shards = lambda root: folder_digests(DomainPaths("histo", root).shards)  # noqa: E731
    assert shards(killed) == shards(whole)
    assert not DomainPaths("histo", killed).work("preprocess").exists()
    assert leftovers(killed) == []
