"""SIGKILL at random moments in every stage, then a re-run: the result is bit-identical to an
uninterrupted run in a second project folder, and nothing temporary is left behind.

Each project is new (parameters never run before there), and the stages run as the CLI runs
them, so no cache of DVC's can hand back a result: every output comes from the re-run itself.
The kill moments are drawn per seed from the stage's own duration in the uninterrupted run, so
they land in imports, reading, training, checkpoint writes and output writes alike.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.cli import STAGES
from tests.conftest import stage_env, tiny_params, write_params

pytestmark = pytest.mark.slow

KILLS_PER_STAGE = 2
SALT = ".secrets/pseudonym-salt"  # privacy.salt_file's default


def params(domain: str) -> dict:
    """The domain's tiny test block, with a pretrain long enough to be killed between
    checkpoints, inside them and after them."""
    if domain == "legal":
        return tiny_params(pretrain={"steps": 24, "checkpoint_every": 4, "warmup_steps": 2},
                           finetune={"label_fractions": [0.1, 1.0], "seeds": [0, 1], "small_fraction_seeds": [0, 1]})
    if domain == "audio":
        from tests.ssl_models.test_audio_pipeline import audio_params as block
    elif domain == "histo":
        from tests.ssl_models.histo_files import histo_params as block
    else:
        from tests.ssl_models.medical_files import medical_params as block
    extra = ({"corpus": "data/medical/default/corpus", "labels": "data/medical/default/labels.csv"}
             if domain == "medical" else {})  # its tiny block names a test corpus: the default data here
    return block(pretrain={"steps": 12, "checkpoint_every": 3, "warmup_steps": 1}, **extra)


def salt_file(domain: str) -> str:
    """privacy.salt_file of the domain's block: the two folders must share the secret."""
    return (params(domain)["domains"][domain].get("privacy") or {}).get("salt_file", SALT)


def start(root: Path, stage: str, domain: str) -> subprocess.Popen:
    """The stage as dvc.yaml runs it, in its own process group (loader workers die with it)."""
    return subprocess.Popen([sys.executable, "-m", "tasks", "--root", str(root), stage, domain], env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(root: Path, stage: str, domain: str) -> float:
    started = time.perf_counter()
    process = start(root, stage, domain)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, f"{stage} failed:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return time.perf_counter() - started


def kill_after(root: Path, stage: str, domain: str, delay: float) -> None:
    process = start(root, stage, domain)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def digests(root: Path, domain: str) -> dict[str, str]:
    """SHA-256 of every file the stages wrote, except run records (times, pids: not results) and
    pretrain's checkpoints (`cache: false`: which ones are kept depends on when a run stopped)."""
    found = {}
    for base in ("data", "models", "reports"):
        for path in sorted((root / base).rglob("*")):
            relative = path.relative_to(root).as_posix()
            if not path.is_file() or path.name.endswith(".run.json") or f"{domain}/checkpoints" in relative:
                continue
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of any writer (`.name.tmp-<pid>...`, `*.tmp`) still present."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp" in p.name and ".venv" not in p.parts)


_uninterrupted: dict[str, tuple[Path, dict[str, str], dict[str, float]]] = {}


def uninterrupted(domain: str, factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, float]]:
    """One uninterrupted run per domain in its own folder (made once per session)."""
    if domain not in _uninterrupted:
        root = factory.mktemp(f"uninterrupted-{domain}")
        write_params(root, params(domain))
        durations = {stage: run(root, stage, domain) for stage in STAGES}
        _uninterrupted[domain] = root, digests(root, domain), durations
    return _uninterrupted[domain]


@pytest.mark.parametrize(("domain", "seed"), [("legal", 0), ("legal", 1), ("legal", 2), ("audio", 3),
                                              ("histo", 4), ("medical", 5)])
def test_killed_anywhere_then_rerun_ends_bit_identical(tmp_path: Path, domain: str, seed: int,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    reference, expected, durations = uninterrupted(domain, tmp_path_factory)
    write_params(tmp_path, params(domain))
    salt = salt_file(domain)
    if (reference / salt).exists():  # a pseudonymising domain: the same secret, so the same pseudonyms
        (tmp_path / salt).parent.mkdir(parents=True)
        shutil.copy2(reference / salt, tmp_path / salt)
    rng = random.Random(seed)
    moments = []
    for stage in STAGES:
        for _ in range(KILLS_PER_STAGE):
            delay = rng.uniform(0.05, 1.0) * durations[stage]
            moments.append(f"{stage}@{delay:.1f}s")
            kill_after(tmp_path, stage, domain, delay)
        run(tmp_path, stage, domain)
        assert not leftovers(tmp_path), f"after {moments}: {leftovers(tmp_path)}"
    got = digests(tmp_path, domain)
    assert got.keys() == expected.keys(), f"kills at {moments}: files differ: {sorted(got.keys() ^ expected.keys())}"
    differing = sorted(name for name in got if got[name] != expected[name])
    assert not differing, f"kills at {moments}: contents differ: {differing}"
