"""No network: `dvc version` / `doctor` / `status` run with every connection attempt to a non-local
address failing (and recorded), in every process they start (tests/network_block.py), and make
none; the block itself catches an attempt. The whole pipeline under the block is
tests/flows/test_worker.py's: a Prefect server, its worker, the flow runs, DVC and every stage."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_models.core.offline import OFFLINE_ENV
from tests.conftest import REPO, SCRIPTS, stage_env
from tests.network_block import blocked_env

@pytest.fixture
def offline_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose processes cannot reach the network; and the file each attempt is written to."""
    return blocked_env(stage_env(), tmp_path, REPO)


def test_the_block_catches_a_connection_attempt(offline_env: tuple[dict[str, str], Path]) -> None:
    env, attempts = offline_env
    probe = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 443), timeout=1)\n"
             "except OSError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert "network blocked by the test" in result.stdout, result.stderr
    assert "192.0.2.1" in attempts.read_text()


def dvc_in_clone(clone: Path, config: str, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    (clone / ".dvc").mkdir(parents=True, exist_ok=True)
    (clone / ".dvc" / "config").write_text(config)
    if not (clone / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    return subprocess.run([str(SCRIPTS / "dvc"), *command, "-v"], cwd=clone, env=env, capture_output=True, text=True)


def wait_for_attempts(attempts: Path, seconds: float) -> str:
    """DVC sends from detached daemons: give them time to try."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not attempts.read_text():
        time.sleep(0.5)
    return attempts.read_text()


@pytest.mark.slow
def test_dvc_version_and_doctor_make_no_connection_attempt(tmp_path: Path,
                                                            offline_env: tuple[dict[str, str], Path]) -> None:
    """As a user runs them in a fresh clone, without our environment: the project's .dvc/config
    turns analytics and update checks off. Without it, the same commands do try (and are caught)."""
    env, attempts = offline_env
    env = {k: v for k, v in env.items() if k not in OFFLINE_ENV}  # not even the offline variables
    project_config = (REPO / ".dvc" / "config").read_text()
    for command in (["version"], ["doctor"], ["status"]):
        result = dvc_in_clone(tmp_path / "clone", project_config, env, *command)
        assert result.returncode == 0, result.stderr
        assert "Spawned" not in result.stdout + result.stderr  # no analytics or updater daemon
    assert wait_for_attempts(attempts, 3) == ""
    plain = dvc_in_clone(tmp_path / "plain", "[core]\n    autostage = false\n", env, "version")
    assert plain.returncode == 0 and "Spawned" in plain.stdout + plain.stderr
    assert "getaddrinfo" in wait_for_attempts(attempts, 30)  # the check works: DVC's daemons were caught


def test_prefect_settings_are_offline_under_the_project_env() -> None:
    probe = ("from prefect.settings import get_current_settings as s; c = s()\n"
             "print(c.server.analytics_enabled, c.cloud.enable_orchestration_telemetry)")
    result = subprocess.run([sys.executable, "-c", probe], env=stage_env(), capture_output=True, text=True, cwd=REPO)
    assert result.stdout.split() == ["False", "False"], result.stderr
    exports = subprocess.run([sys.executable, "-m", "ssl_models.core.offline"], capture_output=True, text=True,
                             cwd=REPO).stdout
    assert "export PREFECT_SERVER_ANALYTICS_ENABLED=false" in exports and "export HF_HUB_OFFLINE=1" in exports
