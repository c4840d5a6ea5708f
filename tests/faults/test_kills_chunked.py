"""SIGKILL part-way through a chunked ingest (and a chunked tiling, and audio preprocess): the re-run
reads back the chunks finished before the kill, does the rest, and ends bit-identical to an uninterrupted run
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


def kill_midway_then_rerun(stage_processes: StageProcesses, root: Path, stage: str, domain: str, chunks: int,
                           output: Path) -> None:
    """Start `stage`, SIGKILL it (and its workers) once a tenth of its `chunks` are kept, run it again:
    it must resume from at least those chunks, finish, and leave no chunk or temporary behind."""
    process = stage_processes.start(root, stage, domain)
    wait_for(f"a tenth of {stage}'s chunks", lambda: chunks_done(root, stage, domain) >= chunks // 10
             or process.wait(0) is not None, timeout=300, every=0.02)
    process.kill()
    finished = chunks_done(root, stage, domain)
    assert chunks // 10 <= finished < chunks, "the kill did not land mid-way: give the stage more to do"
    assert not output.exists()
    code, stderr, _ = stage_processes.run(root, stage, domain)
    assert code == 0, stderr[-3000:]
    resumed = re.search(r"resuming: (\d+) of (\d+) chunks", stderr)
    assert resumed and int(resumed.group(1)) >= finished and int(resumed.group(2)) == chunks, stderr[-3000:]
    assert not DomainPaths(domain, root).work(stage).exists()
    assert leftovers(root) == []


def test_a_killed_chunked_ingest_resumes_at_its_first_unfinished_chunk(tmp_path: Path,
                                                                        stage_processes: StageProcesses) -> None:
    whole = text_project(tmp_path / "whole")
    run_stages(whole, "legal", "ingest")
    killed = text_project(tmp_path / "killed")
    kill_midway_then_rerun(stage_processes, killed, "ingest", "legal", FILES, DomainPaths("legal", killed).manifest)
    assert manifest_digests(killed, "legal") == manifest_digests(whole, "legal")


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
    kill_midway_then_rerun(stage_processes, killed, "preprocess", "histo", SLIDES, DomainPaths("histo", killed).shards)
    assert folder_digests(DomainPaths("histo", killed).shards) == folder_digests(DomainPaths("histo", whole).shards)


RECORDINGS = 120


def audio_project(root: Path) -> Path:
    """RECORDINGS generated 20-second recordings (a gliding tone in noise), unlabeled, made model
    input one recording a chunk on 2 processes; ingested."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    (root / "corpus").mkdir(parents=True)
    seconds = np.arange(16000 * 20) / 16000
    for i in range(RECORDINGS):
        wave = 0.3 * np.sin(2 * np.pi * (150 + 7 * i) * seconds * (1 + 0.05 * np.sin(seconds)))
        noisy = (wave + 0.02 * rng.normal(size=wave.size)).astype(np.float32)
        soundfile.write(root / "corpus" / f"rec-{i:03d}.wav", noisy, 16000)
    write_params(root, {"domains": {"audio": {"module": "audio", "corpus": "corpus", "labels": None,
                                              "ingest": {"workers": 2},
                                              "preprocess": {"workers": 2, "chunk_size": 1}}}})
    run_stages(root, "audio", "ingest")
    return root


def test_a_killed_chunked_audio_preprocess_resumes_at_its_first_unfinished_chunk(
        tmp_path: Path, stage_processes: StageProcesses) -> None:
    """The shards and the normalisation statistics (summed in the manifest's order from every
    chunk's column sums, read back or made again) are those of an uninterrupted run."""
    from tests.tasks.test_parallel_ingest import folder_digests

    whole = audio_project(tmp_path / "whole")
    run_stages(whole, "audio", "preprocess")
    killed = audio_project(tmp_path / "killed")
    kill_midway_then_rerun(stage_processes, killed, "preprocess", "audio", RECORDINGS,
                           DomainPaths("audio", killed).shards)
    resumed = folder_digests(DomainPaths("audio", killed).shards)
    assert resumed == folder_digests(DomainPaths("audio", whole).shards) and "normalisation.json" in resumed
