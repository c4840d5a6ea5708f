"""Two runs on one workspace: the second waits for the domain's lock or refuses in one line;
outputs are never corrupted; processes a stage starts do not wait on their parent's lock."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ssl_models.core.privacy import load_salt
from tasks.cli import EXIT_BUSY, LOCK_HOLDER_ENV, LOCK_TIMEOUT_ENV, domain_lock
from tasks.lineage import verify
from tasks.paths import DomainPaths
from tests.conftest import REPO, stage_env


def cli(root: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "--root", str(root), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**stage_env(), **env})


def hold_lock(root: Path, domain: str, seconds: float) -> subprocess.Popen:
    """A process that holds `domain`'s lock for `seconds` (as a running stage would), then exits."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tasks.cli import domain_lock
        from tasks.paths import DomainPaths
        with domain_lock(DomainPaths({domain!r}, Path({str(root)!r})).lock, "pretrain@{domain}"):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=stage_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_of_a_busy_domain_refuses_in_one_line_naming_the_holder(tiny_project: Path) -> None:
    holder = hold_lock(tiny_project, "legal", 60)
    try:
        started = time.monotonic()
        second = cli(tiny_project, "default_data", "legal", **{LOCK_TIMEOUT_ENV: "1"})
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == EXIT_BUSY, stderr
        lines = [line for line in stderr.splitlines() if not line[:2].isdigit()]  # log lines start with a time
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert f"pid {holder.pid}" in lines[0] and "running pretrain@legal" in lines[0]
        assert "waiting for" in stderr and time.monotonic() - started >= 1
        assert not (tiny_project / "data/legal/default").exists()  # it did no work
    finally:
        holder.kill()
        holder.wait()


def test_the_second_run_waits_for_the_first_then_runs_and_another_domain_does_not_wait(tiny_project: Path) -> None:
    holder = hold_lock(tiny_project, "legal", 4)
    try:
        started = time.monotonic()
        with domain_lock(DomainPaths("audio", tiny_project).lock, "ingest@audio", timeout=0):
            pass  # another domain: free at once
        assert time.monotonic() - started < 2
        second = cli(tiny_project, "default_data", "legal", **{LOCK_TIMEOUT_ENV: "120"})
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 0, stderr
        assert f"held by pid {holder.pid}" in stderr
        assert holder.poll() is not None  # it ran only once the holder had let go
    finally:
        holder.kill()
        holder.wait()
    assert verify(tiny_project / "data/legal/default", tiny_project) == []


@pytest.mark.slow
def test_two_runs_of_one_stage_started_at_once_leave_one_intact_output(tiny_project: Path) -> None:
    go = tiny_project / "go"
    # both import everything first, then start the stage at the same moment
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import tasks.cli, tasks.stages.default_data, ssl_models.core.config, ssl_models.legal_text
        stage = tasks.stages.default_data.default_data
        def held_a_while(*args, **kwargs):  # the lock's holder works 2 s: the other run surely meets it
            time.sleep(2)
            return stage(*args, **kwargs)
        tasks.stages.default_data.default_data = held_a_while
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        sys.exit(tasks.cli.main(["--root", {str(tiny_project)!r}, "default_data", "legal"]))
    """)
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=stage_env()) for _ in range(2)]
    time.sleep(8)
    go.write_text("")
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert any("waiting for" in stderr for _, stderr in outputs), outputs  # one waited for the other
    folder = tiny_project / "data/legal"
    assert verify(folder / "default", tiny_project) == []  # every file hashes as its lineage says
    assert sorted(p.name for p in folder.iterdir()) == [".default.run.json", "default"]  # no temporary


def test_processes_started_by_the_holder_do_not_wait_for_its_lock(tiny_project: Path) -> None:
    """What torch.distributed.run's workers of a stage see: the holder's pid in their environment."""
    lock = DomainPaths("legal", tiny_project).lock
    child = textwrap.dedent(f"""
        from pathlib import Path
        from tasks.cli import domain_lock
        with domain_lock(Path({str(lock)!r}), "pretrain@legal", timeout=0) as held:
            print("inherited" if not held else "took it")
    """)
    with domain_lock(lock, "pretrain@legal", timeout=0):
        inherited = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True,
                                   env={**stage_env(), **os.environ})
        assert inherited.returncode == 0 and inherited.stdout.strip() == "inherited", inherited.stderr
        outsider = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True,
                                  env={k: v for k, v in stage_env().items() if k != LOCK_HOLDER_ENV})
        assert outsider.returncode != 0 and "WorkspaceBusyError" in outsider.stderr
    assert LOCK_HOLDER_ENV not in os.environ


def _first_salt(path: str, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    start.wait()
    try:
        out.put(load_salt(Path(path)).decode())
    except Exception as error:  # noqa: BLE001 - reported to the test
        out.put(f"failed: {error!r}")


def test_first_runs_at_once_share_one_salt(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        path = tmp_path / f"attempt{attempt}" / ".secrets" / "pseudonym-salt"
        start, out = context.Event(), context.Queue()
        workers = [context.Process(target=_first_salt, args=(str(path), start, out)) for _ in range(6)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        start.set()
        salts = [out.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join()
        assert not [s for s in salts if s.startswith("failed")], salts
        assert len(set(salts)) == 1 and path.read_text() == salts[0] and len(salts[0]) == 64
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert sorted(p.name for p in path.parent.iterdir()) == ["pseudonym-salt"]


def test_a_salt_write_killed_midway_leaves_nothing_behind_at_the_next_first_run(tmp_path: Path) -> None:
    path = tmp_path / ".secrets" / "pseudonym-salt"
    path.parent.mkdir()
    dead = path.with_name(f".{path.name}.tmp-{2**22 + 4321}-0badc0de")  # no such process
    live = path.with_name(f".{path.name}.tmp-{os.getppid()}-0badc0de")  # a writer still at work
    dead.write_bytes(b"half a salt")
    live.write_bytes(b"half a salt")
    assert len(load_salt(path)) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == [live.name, "pseudonym-salt"]
