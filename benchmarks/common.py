"""What every benchmark does: reproduce a domain's stages in a project copy, one by one, timed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

SCRIPTS = Path(sys.executable).parent


def stage_env() -> dict[str, str]:
    """The stages call `ssl-pipeline`: this environment's scripts first on PATH, DVC telemetry off."""
    return {**os.environ, "PATH": f"{SCRIPTS}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=folder, env=stage_env(), check=True,
                          capture_output=True, text=True)


def reproduce_stages(folder: Path, domain: str, stages: list[str]) -> list[tuple[str, float]]:
    """`dvc repro -s <stage>@<domain>` for each stage in order; (stage, seconds) each."""
    timings = []
    for stage in stages:
        started = time.perf_counter()
        dvc(folder, "repro", "-s", f"{stage}@{domain}")
        timings.append((stage, time.perf_counter() - started))
    return timings


def apply_override(block: dict, assignment: str) -> None:
    """`pretrain.steps=300` -> block["pretrain"]["steps"] = 300 (value parsed as YAML)."""
    dotted, _, value = assignment.partition("=")
    *parents, leaf = dotted.split(".")
    target = block
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = yaml.safe_load(value)
