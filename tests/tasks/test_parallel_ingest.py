"""Ingest spread over local processes or a Dask cluster writes the same bytes as one process, and a
killed chunked ingest resumes at its first unfinished chunk (issue 23)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssl_models.core.hashing import sha256_file
from tasks.paths import DomainPaths
from tests.conftest import copy_project, reference_params, run_stages, write_params

DOMAINS = ["legal", "audio", "histo", "medical"]


@pytest.fixture(scope="module")
def dask_scheduler() -> Iterator[str]:
    """A Dask LocalCluster of 2 worker processes (one thread each), as a user's cluster would be."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def manifest_digests(root: Path, domain: str) -> dict[str, str]:
    folder = DomainPaths(domain, root).manifest
    return {path.relative_to(folder).as_posix(): sha256_file(path) for path in sorted(folder.rglob("*"))
            if path.is_file()}


def with_ingest(domain: str, **ingest: object) -> dict:
    params = reference_params(domain)
    params["domains"][domain].setdefault("ingest", {}).update(ingest)
    return params


def ingest_again(source: Path, target: Path, domain: str, **ingest: object) -> dict[str, str]:
    """`source`'s project (its default data and salt) ingested again in `target` with these settings."""
    copy_project(source, target)
    shutil.rmtree(DomainPaths(domain, target).manifest)
    write_params(target, with_ingest(domain, **ingest))
    run_stages(target, domain, "ingest")
    return manifest_digests(target, domain)


@pytest.mark.parametrize("domain", DOMAINS)
def test_manifest_quarantine_and_lineage_are_byte_identical_for_1_and_2_workers_and_dask(
        domain: str, tmp_path: Path, dask_scheduler: str, caplog: pytest.LogCaptureFixture) -> None:
    one = tmp_path / "one"
    one.mkdir()
    write_params(one, with_ingest(domain, workers=1, chunk_size=2))
    run_stages(one, domain, "default_data", "ingest")
    expected = manifest_digests(one, domain)
    assert {"manifest.jsonl", "quarantine.jsonl", "summary.json"} <= set(expected)
    with caplog.at_level(logging.INFO, logger="ingest"):
        two = ingest_again(one, tmp_path / "two", domain, workers=2, chunk_size=2)
        on_dask = ingest_again(one, tmp_path / "dask", domain, workers=1, chunk_size=2, scheduler=dask_scheduler)
    engines = [r.getMessage() for r in caplog.records if " chunks on " in r.getMessage()]
    assert any("on 2 local process(es)" in line for line in engines), engines
    assert any(f"on Dask scheduler {dask_scheduler}" in line for line in engines), engines
    assert two == expected
    assert on_dask == expected
    assert not DomainPaths(domain, tmp_path / "two").work("ingest").exists()  # chunks gone once the manifest is in
