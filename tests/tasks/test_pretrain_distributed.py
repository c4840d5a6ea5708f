"""`nproc: 2` in params.yaml and `dvc repro` train with two processes (gloo on this CPU) and end
where one process ends; a stage started by an outside torchrun joins that world."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SCRIPTS, copy_project_code, stage_env, tiny_params, write_params

pytestmark = pytest.mark.slow
WEIGHTS = "models/legal/pretrain/encoder/model.safetensors"
# float32 sums split over two processes round differently; AdamW turns near-zero gradients into
# steps of a share of the learning rate, so a few weights differ by up to ~4e-5 after 3 steps
# (tests/ssl_models/test_legal_distributed.py); a wrong gradient moves them by up to 2 x lr = 4e-3
ATOL = 1e-4


def settings(nproc: int) -> dict:
    return tiny_params(default_data={"max_files": 24}, model={"dropout": 0.0},
                       pretrain={"nproc": nproc, "steps": 3, "checkpoint_every": 3, "warmup_steps": 0})


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=folder, env=stage_env(), capture_output=True,
                          text=True, check=True)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < ATOL, f"weights differ by {worst}"


def test_nproc_2_in_params_trains_two_processes_through_dvc(tmp_path: Path) -> None:
    copy_project_code(tmp_path)
    write_params(tmp_path, settings(1))
    dvc(tmp_path, "repro", "pretrain@legal")  # and the stages before it, in one DVC process
    one = load_file(str(tmp_path / WEIGHTS))
    shutil.rmtree(tmp_path / "models/legal/checkpoints")  # else the run resumes from the finished one
    write_params(tmp_path, settings(2))
    run = dvc(tmp_path, "repro", "-s", "pretrain@legal")
    assert "2 process(es)" in run.stdout + run.stderr
    assert_close(one, load_file(str(tmp_path / WEIGHTS)))
    assert "pretrain@legal" not in dvc(tmp_path, "status", "pretrain@legal").stdout


def test_a_stage_started_by_torchrun_joins_its_world(tmp_path: Path) -> None:
    from tests.conftest import run_stages

    write_params(tmp_path, settings(1))
    run_stages(tmp_path, "legal", "default_data", "ingest", "preprocess", "pretrain")
    one = load_file(str(tmp_path / WEIGHTS))
    shutil.rmtree(tmp_path / "models")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "tasks", "--root", str(tmp_path), "pretrain", "legal"],
                         env=stage_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 process(es)" in run.stderr
    assert_close(one, load_file(str(tmp_path / WEIGHTS)))
