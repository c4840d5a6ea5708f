"""Stage commands in processes of their own, without paying torch's import in each.

`ssl-pipeline <stage> <domain>` is what dvc.yaml runs: a new process that imports torch,
transformers, datasets and MONAI (several seconds here) before it does any work. The fault tests
start such a process well over a hundred times, mostly to kill it. `StageProcesses` starts them
from Python's own forkserver (`multiprocessing`), which imports those libraries and the stages
once and forks a fresh process per command: each runs `tasks.cli.main` in its own session (its
loader and fine-tuning workers die with it), with the stage's environment and its stderr kept,
and is killed with SIGKILL exactly as a separately started one would be. What it skips is only
the import, which writes nothing: every write a kill can interrupt still happens in the killed
process. The subprocess-started CLI itself is still tested where the start matters (the network
block, the lock, one-line errors, the flow and `dvc repro`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# what a stage process imports before its work; torch first (the others load it)
PRELOAD = ["torch", "transformers", "datasets", "monai", "sklearn.linear_model", "safetensors.torch", "lightly.loss",
           "timm", "tasks.cli", "tasks.io", "tasks.lineage", "tasks.stages.pretrain", "ssl_models.core.domain",
           "ssl_models.core.config", "ssl_models.legal_text.methods", "ssl_models.histopathology.methods",
           "ssl_models.medical3d.methods", "ssl_models.audio.methods"]


def _stage_main(argv: list[str], env: dict[str, str], cwd: str, stderr_path: str) -> None:
    """The body of one command's process (what `python -m tasks ARGV` runs after its imports)."""
    os.setsid()  # a session of its own: the test kills it and everything it started at once
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for descriptor, target in ((os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2),
                               (os.open(os.devnull, os.O_WRONLY), 1)):
        os.dup2(descriptor, target)
        os.close(descriptor)
    from tasks.cli import main

    sys.exit(main(argv))


@dataclass
class StageProcess:
    process: multiprocessing.process.BaseProcess
    stderr_path: Path

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status once it ended within `timeout` seconds, else None."""
        self.process.join(timeout)
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL the process and everything in its session, then reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.join()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


class StageProcesses:
    """Starts `ssl-pipeline` commands as forks of one process that imported the stages' libraries."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        """`env`: every command's environment; `logs`: the folder their stderr files go to."""
        self.env = dict(env)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.logs = logs
        self.count = 0

    def start(self, root: Path, stage: str, domain: str, env: dict[str, str] | None = None) -> StageProcess:
        """Start a command; `env`: variables set for this one over the common environment."""
        self.count += 1
        stderr_path = self.logs / f"{self.count:05d}-{stage}-{domain}.err"
        process = self.context.Process(target=_stage_main, daemon=False,
                                       args=(["--root", str(root), stage, domain], {**self.env, **(env or {})},
                                             os.getcwd(), str(stderr_path)))
        process.start()
        return StageProcess(process, stderr_path)

    def run(self, root: Path, stage: str, domain: str, timeout: float = 600) -> tuple[int | None, str, float]:
        """Run a command to its end: (exit status, stderr, seconds)."""
        started = time.perf_counter()
        process = self.start(root, stage, domain)
        code = process.wait(timeout)
        if code is None:
            process.kill()
        return code, process.stderr, time.perf_counter() - started

    def run_world(self, root: Path, stage: str, domain: str, nproc: int, timeout: float = 600) -> list[str]:
        """Run a command as the `nproc` ranks of one torch.distributed world on this node, as the
        processes torchrun would start (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
        and MASTER_PORT set; one torch thread each, as the stage's own relaunch gives them); returns
        their stderr, after asserting that every rank exited 0. The launch itself (nproc in
        params.yaml -> torch.distributed.run) is tested in tests/tasks/test_pretrain_distributed.py."""
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        world = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", "1")}
        ranks = [self.start(root, stage, domain, {**world, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(nproc)]
        codes = [rank.wait(timeout) for rank in ranks]
        for rank in ranks:
            rank.kill()  # any rank still running (a timeout), and what it started
        errors = [rank.stderr for rank in ranks]
        assert codes == [0] * nproc, f"{stage}@{domain} ranks exited {codes}:\n" + "\n".join(e[-2000:] for e in errors)
        return errors

    def kill_after(self, root: Path, stage: str, domain: str, delay: float) -> None:
        """Start a command and SIGKILL it (with what it started) after `delay` seconds, unless it ended."""
        process = self.start(root, stage, domain)
        if process.wait(delay) is None:
            process.kill()
