"""A cancel stops the work (issue 21): SIGTERM or SIGINT to a stage, to `dvc repro` or to the flow
reaches every process under it; they stop within seconds, the domain's lock is free, no traceback
is printed, and the next run resumes pretraining from the last checkpoint.

The first tests run the CLI's own handling on a stand-in stage (a blocking function under the
domain lock with a child process: cheap); the slow ones cancel a real pretrain mid-way through
`dvc repro` and through `python -m flows.pipeline`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import (
    SCRIPTS,
    copy_project,
    copy_project_code,
    stage_env,
    tiny_params,
    wait_for,
    write_params,
    wsd_plan_resuming,
)

STOPPED_WITHIN_S = 10  # the bound: no process of the run alive 10 s after the signal

# A stand-in stage: under the domain lock it starts a child and blocks; its clean-up takes CLEANUP_S
# seconds (a second signal lands there). argv: project root, CLEANUP_S.
STAND_IN = """
import subprocess, sys, time
from pathlib import Path
from tasks import cli

root, cleanup = Path(sys.argv[1]), float(sys.argv[2])

def blocking_stage(args, loaded):
    with cli.domain_lock(root / ".ssl-pipeline/locks/legal.lock", "pretrain@legal"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (root / "child.pid").write_text(str(child.pid))
        try:
            time.sleep(120)
        finally:
            (root / "unwinding").write_text("")
            time.sleep(cleanup)
    return 0

cli.run_command = blocking_stage
sys.exit(cli.main(["--root", str(root), "pretrain", "legal"]))
"""


_wait = functools.partial(wait_for, every=0.1)


def lock_is_free(root: Path, domain: str = "legal") -> bool:
    """The domain's lock can be taken at once (and is let go again)."""
    with open(root / ".ssl-pipeline" / "locks" / f"{domain}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def tree(pid: int) -> list[psutil.Process]:
    """The process and every process under it, now."""
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def assert_all_stop(processes: list[psutil.Process], what: str, within: float = STOPPED_WITHIN_S) -> None:
    """Every one of `processes` ends within `within` seconds (none may be a Popen's: psutil reaps it)."""
    _, alive = psutil.wait_procs(processes, timeout=max(0.0, within))
    described = [f"{p.pid} {' '.join(p.cmdline()[:6])}" for p in alive if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not described, f"{what}: still running {STOPPED_WITHIN_S} s after the signal: {described}"


def start_stand_in(root: Path, cleanup: float = 0.0, **env: str) -> subprocess.Popen:
    (root / ".ssl-pipeline" / "locks").mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", STAND_IN, str(root), str(cleanup)], stderr=subprocess.PIPE,
                               text=True, env={**stage_env(), **env}, start_new_session=True)
    _wait("the stand-in stage's child", lambda: (root / "child.pid").exists(), 30)
    return process


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_stage_stops_its_children_releases_the_lock_and_says_one_line(
        tmp_path: Path, signum: int, status: int) -> None:
    stage = start_stand_in(tmp_path)
    child = psutil.Process(int((tmp_path / "child.pid").read_text()))
    assert not lock_is_free(tmp_path)
    stage.send_signal(signum)
    _, stderr = stage.communicate(timeout=STOPPED_WITHIN_S)
    assert stage.returncode == status, stderr
    assert stderr.strip().splitlines() == [
        f"cancelled: pretrain@legal stopped on {signal.Signals(signum).name}, with every process it started; "
        "run it again to go on (pretrain resumes from its last checkpoint)"]
    assert_all_stop([child], "the stage's child")
    assert lock_is_free(tmp_path)
    assert (tmp_path / ".ssl-pipeline/logs/pretrain-legal.error").read_text().startswith("cancelled:")


def test_a_second_signal_while_unwinding_prints_no_traceback(tmp_path: Path) -> None:
    stage = start_stand_in(tmp_path, cleanup=1.5)
    stage.send_signal(signal.SIGTERM)
    _wait("the stage to unwind", lambda: (tmp_path / "unwinding").exists(), STOPPED_WITHIN_S)
    stage.send_signal(signal.SIGTERM)
    stage.send_signal(signal.SIGINT)
    _, stderr = stage.communicate(timeout=STOPPED_WITHIN_S)
    assert stage.returncode == 143 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("cancelled: pretrain@legal"), stderr
    assert lock_is_free(tmp_path)


def test_a_stage_dvc_started_stops_when_dvc_dies_and_a_nohup_one_does_not(tmp_path: Path) -> None:
    """A parent that dies at once (`dvc repro` on SIGTERM; here SIGKILLed): the kernel sends the
    stage SIGTERM (DVC_STAGE in its environment says DVC started it). Without DVC_STAGE (a stage
    left running under nohup by a shell that exits) it trains on."""
    for started_by_dvc in (True, False):
        root = tmp_path / f"dvc-{started_by_dvc}"
        (root / ".ssl-pipeline" / "locks").mkdir(parents=True)
        env = stage_env()
        env.pop("DVC_STAGE", None)
        if started_by_dvc:
            env["DVC_STAGE"] = "pretrain@legal"
        parent = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys, time; "
             f"subprocess.Popen([sys.executable, '-c', {STAND_IN!r}, {str(root)!r}, '0']); time.sleep(120)"],
            env=env, start_new_session=True)
        orphans: list[psutil.Process] = []
        try:
            _wait("the stand-in stage's child", lambda: (root / "child.pid").exists(), 30)  # noqa: B023
            orphans = tree(parent.pid)[1:]
            parent.kill()
            parent.wait()
            if started_by_dvc:
                assert_all_stop(orphans, "a stage whose parent died")
                assert lock_is_free(root)
            else:
                time.sleep(1.0)
                assert all(p.is_running() for p in orphans) and not lock_is_free(root)
        finally:
            for process in orphans:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            parent.kill()
            parent.wait()


# --- a real pretrain, cancelled mid-way through `dvc repro` and through the flow

WARMUP = 10


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (root / "models/legal/checkpoints").glob("step_*.pt"))


def long_pretrain_params() -> dict:
    """The tiny legal block with a wsd plan far longer than any test (cut short after the cancel,
    so that the resumed run ends soon whatever the step rate)."""
    return tiny_params(pretrain={"schedule": "wsd", "steps": 10_000_000, "warmup_steps": WARMUP,
                                 "checkpoint_every": 20, "seed": 11})


@pytest.fixture
def long_pretrain_project(built_legal: Callable[[str], Path], tmp_path: Path) -> Path:
    """A git + DVC project with this checkout's code, the tiny legal corpus ingested and
    preprocessed (recorded in dvc.lock: up to date) and a pretrain far longer than the test."""
    folder = tmp_path / "project"
    folder.mkdir()
    copy_project_code(folder)
    copy_project(built_legal("preprocess"), folder)
    write_params(folder, long_pretrain_params())
    committed = subprocess.run([str(SCRIPTS / "dvc"), "commit", "-f", "default_data@legal", "ingest@legal",
                                "preprocess@legal"], cwd=folder, env=stage_env(), capture_output=True, text=True)
    assert committed.returncode == 0, committed.stderr
    return folder


def cancel_mid_pretrain(folder: Path, command: list[str], env: dict[str, str], log: Path,
                        signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Start `command` in `folder`, send it `signum` once pretrain wrote a checkpoint; assert that
    every process of the run ends within STOPPED_WITHIN_S and the lock is free. Its exit status and
    output."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            _wait("pretrain's first checkpoint", lambda: checkpoint_steps(folder) or process.poll() is not None, 600,
                  every=0.5)
            assert process.poll() is None, log.read_text()[-3000:]
            run = tree(process.pid)
            assert any("pretrain" in " ".join(p.cmdline()) for p in run[1:]), [p.cmdline() for p in run]
            process.send_signal(signum)
            deadline = time.monotonic() + STOPPED_WITHIN_S
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOPPED_WITHIN_S)
            assert process.poll() is not None, f"{command[:4]} still running {STOPPED_WITHIN_S} s after {signum}"
            assert_all_stop(run[1:], " ".join(command[:4]), deadline - time.monotonic())
        finally:
            with contextlib.suppress(psutil.Error):
                for member in tree(process.pid):
                    member.kill()
            process.wait()
    assert lock_is_free(folder)
    assert not (folder / "models/legal/pretrain/encoder").exists()
    return process.returncode, log.read_text()


def assert_next_run_resumes(folder: Path) -> None:
    """`dvc repro` of pretrain, with the plan cut short just past the newest checkpoint, resumes there."""
    last = checkpoint_steps(folder)[-1]
    params = long_pretrain_params()
    params["domains"]["legal"]["pretrain"]["steps"] = steps = wsd_plan_resuming(last, WARMUP)
    write_params(folder, params)
    rerun = subprocess.run([str(SCRIPTS / "dvc"), "repro", "-s", "pretrain@legal"], cwd=folder, env=stage_env(),
                           capture_output=True, text=True)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    resumed = re.search(r"resuming legal pretraining from step (\d+)", output)
    assert resumed and int(resumed.group(1)) == last, output[-3000:]
    log = yaml.safe_load((folder / "models/legal/pretrain/log.json").read_text())
    assert log["checkpoints"][-1]["step"] == steps


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "torchrun-2"])
def test_sigterm_to_dvc_repro_stops_the_stage_and_the_next_run_resumes(long_pretrain_project: Path,
                                                                        tmp_path: Path, nproc: int) -> None:
    """nproc 2: the stage runs torch.distributed.run and its two training processes (gloo): all stop."""
    folder = long_pretrain_project
    params = long_pretrain_params()
    params["domains"]["legal"]["pretrain"]["nproc"] = nproc
    write_params(folder, params)
    # DVC runs a stage as `$SHELL -c CMD`; /bin/sh where SHELL is unset (CI). dash does not exec CMD,
    # so the stage's parent is a shell that outlives DVC: the case the stage must watch for itself
    env = {**stage_env(), "SHELL": "/bin/sh"}
    status, output = cancel_mid_pretrain(folder, [str(SCRIPTS / "dvc"), "repro", "-s", "pretrain@legal"],
                                         env, tmp_path / "dvc.log")
    assert status == -signal.SIGTERM  # DVC dies at once; the stage gets SIGTERM from the kernel or its watch
    assert f"{nproc} process(es)" in output
    assert "cancelled: pretrain@legal stopped on SIGTERM" in output and "Traceback" not in output, output[-3000:]
    assert_next_run_resumes(folder)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_flow_stops_the_stage_and_the_temporary_server_and_the_next_run_resumes(
        long_pretrain_project: Path, tmp_path: Path, signum: int) -> None:
    """SIGTERM goes through Prefect's handler (the run is recorded Crashed) then the flow's; SIGINT,
    which DVC ignores in the thread running a stage, reaches the flow's waiting main thread."""
    folder = long_pretrain_project
    env = {**stage_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true"}
    env.pop("PREFECT_API_URL", None)  # the flow's own temporary server
    status, output = cancel_mid_pretrain(folder, [sys.executable, "-m", "flows.pipeline", "--domain", "legal"], env,
                                         tmp_path / "flow.log", signum)
    assert status == 128 + signum, output[-3000:]
    assert f"cancelled: the flow stopped on {signal.Signals(signum).name}" in output, output[-3000:]
    # the flow stopped the stage with SIGTERM
    assert "cancelled: pretrain@legal stopped on SIGTERM" in output and "Traceback" not in output, output[-3000:]
    assert "Crash detected" in output and "Retrying" not in output, output[-3000:]
    assert "ingest@legal: up to date" in output, output[-3000:]
    assert_next_run_resumes(folder)
