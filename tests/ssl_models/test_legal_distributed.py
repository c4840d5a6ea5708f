"""The legal methods on 2 processes (DDP, gloo on this CPU) with half the batch each end where
1 process with the whole batch ends: the same first loss and the same weights after 3 steps;
and a 2-process run killed mid-way resumes on 1 process to the uninterrupted run's weights.

BERT's dropout is off (model.dropout 0: with it each process would draw its own masks from
torch's global generator); the token masks come from each block's seed, so only float rounding
differs: the gradients are summed in another order (DDP's all-reduce of two half-batch means)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tasks.cli import run_stage
from tests.conftest import (
    assert_close_weights,
    copy_project,
    pretrained_state,
    run_stages,
    stage_env,
    tiny_params,
    write_params,
)
from tests.ssl_models.test_legal_vocab import write_generic_base_checkpoint

pytestmark = pytest.mark.slow

# Float32 rounding: the gradients agree to ~2e-6 relative and the first loss to ~1e-7, but
# AdamW's step is lr * m / (sqrt(v) + eps): an element whose gradient is near zero (|g| of ~1e-7
# by chance) moves by another fraction of lr when its sum is taken in another order. Measured
# with lr 0.002: 3.6e-5 on one element of mlm_span_contrastive's intermediate.dense.weight after
# 3 steps (2.5e-8 for mlm). So weights within 1e-4 (5% of lr); a real gradient error (a missing
# gather gradient, a wrong mean) flips the step of many elements, by up to 2 lr (4e-3).
WEIGHT_ATOL, LOSS_RTOL = 1e-4, 1e-5
SETTINGS = {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "warmup_steps": 0, "num_workers": 0}
WEIGHTS = "models/legal/pretrain/encoder/model.safetensors"


def params(dapt: bool = False, **pretrain: object) -> dict:
    if not dapt:
        return tiny_params(cpu_threads=1, model={"dropout": 0.0}, pretrain=pretrain)
    # continued pretraining of the tiny base checkpoint, its vocabulary extended by the corpus' words
    return tiny_params(cpu_threads=1, model={"dropout": 0.0, "base_checkpoint": "base"}, pretrain=pretrain,
                       preprocess={"tokenizer": "base", "extend_vocabulary": 20, "extend_min_frequency": 5})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("legal_distributed")
    write_params(root, params())
    run_stages(root, "legal", "default_data", "ingest", "preprocess")
    yield root
    torch.set_num_threads(threads)  # the stages set cpu_threads for the whole test process


@pytest.fixture(scope="module")
def dapt_project(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`project` preprocessed again for DAPT of a tiny base checkpoint (generic English vocabulary,
    extended by 20 words of the training split)."""
    root = copy_project(project, tmp_path_factory.mktemp("legal_distributed_dapt"))
    write_generic_base_checkpoint(root / "base")
    write_params(root, params(dapt=True))
    run_stages(root, "legal", "preprocess")
    return root


@pytest.mark.parametrize("method, options, dapt", [
    ("mlm", {}, False), ("mlm_span_contrastive", {}, False),
    # self-distillation: the teacher's term is a mean over the global batch's tokens too
    ("mlm", {"distill_weight": 1.0}, True)], ids=["mlm", "mlm_span_contrastive", "mlm-distilled-extended-vocabulary"])
def test_two_processes_with_half_the_batch_each_end_where_one_process_ends(
        request: pytest.FixtureRequest, method: str, options: dict, dapt: bool) -> None:
    project = request.getfixturevalue("dapt_project" if dapt else "project")
    write_params(project, params(dapt, method=method, options=options))
    single = pretrained_state(project, "legal", nproc=1, **SETTINGS)
    double = pretrained_state(project, "legal", nproc=2, **SETTINGS)
    assert [step for step, _ in single[1]["loss"]] == [step for step, _ in double[1]["loss"]] == [1, 2, 3]
    first, again = single[1]["loss"][0][1], double[1]["loss"][0][1]
    print(f"\n{method}: first loss {first:.6f} and {again:.6f}, relative difference {abs(first - again) / first:.2e}")
    assert again == pytest.approx(first, rel=LOSS_RTOL)
    assert_close_weights(WEIGHT_ATOL, single[0], double[0], method)


def test_loader_workers_change_nothing(project: Path) -> None:
    write_params(project, params(method="mlm"))
    inline, _ = pretrained_state(project, "legal", nproc=1, **{**SETTINGS, "num_workers": 0})
    workers, _ = pretrained_state(project, "legal", nproc=1, **{**SETTINGS, "num_workers": 2})
    assert inline.keys() == workers.keys()
    for name in inline:
        assert torch.equal(inline[name], workers[name]), name


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, as a lost machine would end them. torchrun
    starts each training process in a session of its own, so killing the launcher's process
    group alone leaves them training (and writing checkpoints) as orphans."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def test_a_run_killed_on_two_processes_resumes_on_one_to_the_uninterrupted_weights(
        project: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = {**SETTINGS, "steps": 30, "checkpoint_every": 3, "warmup_steps": 2}
    write_params(project, params(method="mlm"))
    uninterrupted, _ = pretrained_state(project, "legal", nproc=1, **settings)

    shutil.rmtree(project / "models")
    write_params(project, params(method="mlm", nproc=2, **settings))
    run = subprocess.Popen([sys.executable, "-m", "tasks", "--root", str(project), "pretrain", "legal"],
                           env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = project / "models/legal/checkpoints"
    deadline = time.time() + 180
    while not list(checkpoints.glob("step_*.pt")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(run.pid)  # the stage, torch.distributed.run and its 2 training processes
    run.wait()
    if (project / WEIGHTS).exists():
        pytest.skip("the run finished before it could be killed; machine too fast for this timing")
    written = sorted(checkpoints.glob("step_*.pt"))
    assert written, "no checkpoint was written before the kill"
    print(f"\nkilled after {written[-1].name}")

    block = yaml.safe_load((project / "params.yaml").read_text())
    block["domains"]["legal"]["pretrain"]["nproc"] = 1
    write_params(project, block)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        history = run_stage("pretrain", "legal", project)
    assert f"resuming legal pretraining from step {int(written[-1].stem.split('_')[1])}" in caplog.text
    assert [c["step"] for c in history["checkpoints"]] == list(range(3, 31, 3))
    resumed = {f"model.safetensors:{k}": v for k, v in load_file(str(project / WEIGHTS)).items()}
    assert_close_weights(WEIGHT_ATOL, uninterrupted, resumed, "killed on 2 processes, resumed on 1, after 30 steps")
