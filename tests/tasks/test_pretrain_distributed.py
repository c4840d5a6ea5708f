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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The stages up to pretrain with one process (in this one), made once for the module: the
    folder and the weights both tests compare against (conftest.worker_group keeps them together)."""
    from tests.conftest import run_stages

    root = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    write_params(root, settings(1))
    run_stages(root, "legal", "default_data", "ingest", "preprocess", "pretrain")
    torch.set_num_threads(threads)  # cpu_threads set it for the stages
    return root, load_file(str(root / WEIGHTS))


def shards_of(reference: Path, folder: Path, nproc: int) -> None:
    """`folder` gets the reference's shards (the raw data and the salt too), no model, and the settings."""
    shutil.copytree(reference, folder, symlinks=True, dirs_exist_ok=True)
    shutil.rmtree(folder / "models")
    write_params(folder, settings(nproc))


def test_nproc_2_in_params_trains_two_processes_through_dvc(
        one_process: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    reference, one = one_process
    copy_project_code(tmp_path)
    shards_of(reference, tmp_path, 2)
    run = dvc(tmp_path, "repro", "-s", "pretrain@legal")
    assert "2 process(es)" in run.stdout + run.stderr
    assert_close(one, load_file(str(tmp_path / WEIGHTS)))
    assert "pretrain@legal" not in dvc(tmp_path, "status", "pretrain@legal").stdout


def test_a_stage_started_by_torchrun_joins_its_world(one_process: tuple[Path, dict[str, torch.Tensor]],
                                                    tmp_path: Path) -> None:
    reference, one = one_process
    shards_of(reference, tmp_path, 1)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "tasks", "--root", str(tmp_path), "pretrain", "legal"],
                         env=stage_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 process(es)" in run.stderr
    assert_close(one, load_file(str(tmp_path / WEIGHTS)))
