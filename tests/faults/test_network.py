"""No network: the whole tiny pipeline runs, and `dvc version` / `dvc doctor` run, with every
connection attempt to a non-local address failing (and recorded), in every process they start.

The block is a `sitecustomize` module put first on PYTHONPATH: Python imports it at start-up in
every process (stage commands, loader and fine-tuning workers, DVC's daemons), before any library."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_models.core.offline import OFFLINE_ENV
from tasks.cli import STAGES
from tests.conftest import REPO, SCRIPTS, stage_env

BLOCK = '''
import ipaddress, os, socket, subprocess

_LOG = os.environ["SSL_TEST_NETWORK_LOG"]
_HOOK = os.path.dirname(os.path.abspath(__file__))
_HOSTS = {"localhost", socket.gethostname()}
_popen_init = subprocess.Popen.__init__


def _popen_keeping_the_block(self, *args, **kwargs):
    """A child given an environment of its own (DVC's daemons reset PYTHONPATH) still loads this module."""
    env = kwargs.get("env")
    if env is not None:
        env = dict(env)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([_HOOK] + [p for p in parts if p != _HOOK])
        env["SSL_TEST_NETWORK_LOG"] = _LOG
        kwargs["env"] = env
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _popen_keeping_the_block


def _refuse(what):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network blocked by the test: {what}")


def _local(host):
    if host is None or host in _HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


def _guard(method):
    def guarded(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"{method.__name__} {address!r}")
        return method(self, address, *args)
    return guarded


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
socket.socket.sendto = (lambda send: lambda self, data, *rest: (
    _refuse(f"sendto {rest[-1]!r}") if self.family in (socket.AF_INET, socket.AF_INET6)
    and not _local(rest[-1][0]) else send(self, data, *rest)))(socket.socket.sendto)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture
def offline_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose processes cannot reach the network; and the file each attempt is written to."""
    hook = tmp_path / "network-block"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK)
    attempts = tmp_path / "network-attempts.log"
    attempts.write_text("")
    env = {**stage_env(), "PYTHONPATH": f"{hook}:{REPO}", "SSL_TEST_NETWORK_LOG": str(attempts)}
    for key in [k for k in env if k.endswith("_PROXY") or k.endswith("_proxy")]:
        del env[key]
    return env, attempts


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


@pytest.mark.slow
def test_the_tiny_pipeline_runs_with_the_network_blocked(tiny_project: Path,
                                                         offline_env: tuple[dict[str, str], Path]) -> None:
    env, attempts = offline_env
    for stage in STAGES:
        result = subprocess.run([sys.executable, "-m", "tasks", "--root", str(tiny_project), stage, "legal"],
                                cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
        assert "network blocked" not in result.stderr, result.stderr
    assert attempts.read_text() == ""
    assert (tiny_project / "reports/legal/report/report.md").exists()
