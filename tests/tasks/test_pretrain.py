from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.cli import run_stage
from tasks.io import read_json
from tasks.lineage import hash_outputs
from tests.conftest import stage_env, tiny_params, write_params

WEIGHTS = "models/legal/pretrain/encoder/model.safetensors"


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / WEIGHTS))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def pretrain_outputs(root: Path) -> dict[str, str]:
    """Digests of every file of the pretrain output. The killed run is a subprocess with the
    stage's offline environment, the re-run this process: the bytes must not depend on that
    (transformers writes its loading options into tokenizer_config.json; the encoder drops them)."""
    return hash_outputs(root / "models/legal/pretrain")


def test_two_runs_give_bit_identical_weights_and_log_rankme(pretrained_project: Path) -> None:
    ingested_project = pretrained_project  # the session's pretrain run is the first of the two
    first = final_weights(ingested_project)
    log = read_json((ingested_project / "models/legal/pretrain/log.json"))
    assert [c["step"] for c in log["checkpoints"]] == [4, 8, 12]
    assert all(c["rankme"] > 1.0 for c in log["checkpoints"])
    assert log["checkpoints"][-1]["loss"] < log["checkpoints"][0]["loss"]  # it learns
    # MLM is a reconstruction objective: the last checkpoint is the encoder, the others candidates
    assert log["choice"]["rule"] == "last" and log["choice"]["step"] == 12 and "RankMe is not" in log["choice"]["reason"]
    candidates = ingested_project / "models/legal/pretrain/candidates"
    assert sorted(p.name for p in candidates.iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]
    shutil.rmtree(ingested_project / "models")
    run_stage("pretrain", "legal", ingested_project)
    assert_identical(first, final_weights(ingested_project))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(ingested_project: Path) -> None:
    settings = {"steps": 60, "checkpoint_every": 10, "warmup_steps": 5, "schedule": "wsd"}
    write_params(ingested_project, tiny_params(pretrain=settings))
    run_stage("pretrain", "legal", ingested_project)
    uninterrupted = final_weights(ingested_project)
    uninterrupted_outputs = pretrain_outputs(ingested_project)
    shutil.rmtree(ingested_project / "models")

    worker = subprocess.Popen([sys.executable, "-m", "tasks", "--root", str(ingested_project), "pretrain", "legal"], env=stage_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = (ingested_project / "models/legal/checkpoints")
    deadline = time.time() + 120
    while not list(checkpoints.glob("step_00000020.pt")) and worker.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    if (ingested_project / WEIGHTS).exists():
        pytest.skip("the run finished before it could be killed; machine too fast for this timing")
    assert list(checkpoints.glob("step_*.pt")), "no checkpoint was written before the kill"

    history = run_stage("pretrain", "legal", ingested_project)  # resumes from the last checkpoint
    assert_identical(uninterrupted, final_weights(ingested_project))
    # the candidate encoders (kept in the checkpoints folder across the kill) and the log too
    assert pretrain_outputs(ingested_project) == uninterrupted_outputs
    assert [c["step"] for c in history["checkpoints"]] == [10, 20, 30, 40, 50, 60]


def test_checkpoints_of_another_configuration_are_not_resumed(ingested_project: Path) -> None:
    write_params(ingested_project, tiny_params(pretrain={"learning_rate": 0.01}))
    run_stage("pretrain", "legal", ingested_project)
    clean = final_weights(ingested_project)
    shutil.rmtree(ingested_project / "models")
    write_params(ingested_project, tiny_params())
    run_stage("pretrain", "legal", ingested_project)  # leaves checkpoints of the default learning rate behind
    write_params(ingested_project, tiny_params(pretrain={"learning_rate": 0.01}))
    run_stage("pretrain", "legal", ingested_project)
    assert_identical(clean, final_weights(ingested_project))  # started over instead of resuming a foreign run


@pytest.mark.slow
def test_preprocess_in_two_processes_gives_identical_shards(ingested_project: Path) -> None:
    """The WordPiece trainer numbers its alphabet in hash-map order, which changes between
    processes; the shards (and so the pretrained weights) must not."""
    digests = []
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "tasks", "--root", str(ingested_project), "preprocess", "legal"], env=stage_env(), check=True,
                       capture_output=True)
        digests.append(read_json((ingested_project / "data/legal/shards/lineage.json"))["outputs"])
    assert digests[0] == digests[1]
