"""SIGKILL at random moments in every stage, then a re-run: the result is bit-identical to an
uninterrupted run in a second project folder, and nothing temporary is left behind.

Each project is new (parameters never run before there), and the stages run as the CLI runs
them (`tasks.cli.main` in a process of its own, forked after the imports: tests/stage_processes.py),
so no cache of DVC's can hand back a result: every output comes from the re-run itself. The
uninterrupted run is the session's reference run of the domain (conftest.reference_run). The kill
moments are drawn per seed from the stage's own duration in the uninterrupted run, so they land
in reading, training, checkpoint writes and output writes alike.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tasks.cli import STAGES
from tests.conftest import ReferenceRun, output_digests, reference_params, write_params
from tests.stage_processes import StageProcesses

pytestmark = pytest.mark.slow

KILLS_PER_STAGE = 2
SALT = ".secrets/pseudonym-salt"  # privacy.salt_file's default


def salt_file(domain: str) -> str:
    """privacy.salt_file of the domain's block: the two folders must share the secret."""
    return (reference_params(domain)["domains"][domain].get("privacy") or {}).get("salt_file", SALT)


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of any writer (`.name.tmp-<pid>...`, `*.tmp`) still present."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp" in p.name and ".venv" not in p.parts)


# a domain's tests run in one worker process, beside its reference run (conftest.worker_group)
@pytest.mark.parametrize(("domain", "seed"), [("legal", 0), ("legal", 1), ("legal", 2), ("audio", 3),
                                              ("histo", 4), ("medical", 5)])
def test_killed_anywhere_then_rerun_ends_bit_identical(tmp_path: Path, domain: str, seed: int,
                                                       reference_run, stage_processes: StageProcesses) -> None:
    reference: ReferenceRun = reference_run(domain)
    write_params(tmp_path, reference_params(domain))
    salt = salt_file(domain)
    if (reference.root / salt).exists():  # a pseudonymising domain: the same secret, so the same pseudonyms
        (tmp_path / salt).parent.mkdir(parents=True)
        shutil.copy2(reference.root / salt, tmp_path / salt)
    rng = random.Random(seed)
    moments = []
    for stage in STAGES:
        for _ in range(KILLS_PER_STAGE):
            delay = rng.uniform(0.05, 1.0) * reference.durations[stage]
            moments.append(f"{stage}@{delay:.1f}s")
            stage_processes.kill_after(tmp_path, stage, domain, delay)
        code, stderr, _ = stage_processes.run(tmp_path, stage, domain)
        assert code == 0 and "Traceback" not in stderr, f"{stage} failed after {moments}:\n{stderr[-3000:]}"
        assert not leftovers(tmp_path), f"after {moments}: {leftovers(tmp_path)}"
    got = output_digests(tmp_path, domain)
    expected = reference.digests
    assert got.keys() == expected.keys(), f"kills at {moments}: files differ: {sorted(got.keys() ^ expected.keys())}"
    differing = sorted(name for name in got if got[name] != expected[name])
    assert not differing, f"kills at {moments}: contents differ: {differing}"
