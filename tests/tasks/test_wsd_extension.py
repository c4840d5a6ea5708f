"""Continued pretraining that can be extended (issue 12, part 6): with the warmup-stable-decay
schedule, raising `steps` resumes from the latest checkpoint still in the stable phase and
decays from there, ending bit-identical to a run planned that long from the start (Hägele et
al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations", 2024: no
re-warming of already-decayed weights). Lowering `steps` works the same way while a stable
checkpoint before the new decay is kept."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.cli import run_stage
from tasks.io import read_json
from tests.conftest import tiny_params, write_params

WEIGHTS = "models/legal/pretrain/encoder/model.safetensors"
CHECKPOINTS = "models/legal/checkpoints"
# decay over the last quarter: 12 steps decay from 9 (a checkpoint there besides every 4th step),
# 20 from 15, 17 from 12
WSD = {"schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.25, "checkpoint_every": 4}


def run(root: Path, steps: int, keep_checkpoints: int, caplog: pytest.LogCaptureFixture) -> list[str]:
    write_params(root, tiny_params(pretrain={**WSD, "steps": steps, "keep_checkpoints": keep_checkpoints}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        run_stage("pretrain", "legal", root)
    return [r.getMessage() for r in caplog.records]


def fresh(root: Path, steps: int, caplog: pytest.LogCaptureFixture) -> tuple[dict[str, torch.Tensor], dict]:
    shutil.rmtree(root / "models", ignore_errors=True)
    assert not any(m.startswith("resuming") for m in run(root, steps, 1, caplog))
    result = load_file(str(root / WEIGHTS)), read_json(root / "models/legal/pretrain/log.json")
    shutil.rmtree(root / "models")
    return result


def assert_same_run(extended: tuple[dict[str, torch.Tensor], dict], planned: tuple[dict[str, torch.Tensor], dict]) -> None:
    weights, log = extended
    assert weights.keys() == planned[0].keys()
    for name in weights:
        assert torch.equal(weights[name], planned[0][name]), f"{name} differs"
    # the same losses, RankMe and learning rates at every logged checkpoint: the plan's rates after the resume
    assert log["checkpoints"] == planned[1]["checkpoints"] and log["loss"] == planned[1]["loss"]


def outcome(root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(root / WEIGHTS)), read_json(root / "models/legal/pretrain/log.json")


def test_raising_steps_continues_from_the_stable_phase_like_a_run_planned_that_long(
        ingested_project: Path, caplog: pytest.LogCaptureFixture) -> None:
    planned_20 = fresh(ingested_project, 20, caplog)
    planned_17 = fresh(ingested_project, 17, caplog)

    run(ingested_project, 12, 10, caplog)
    folder = ingested_project / CHECKPOINTS
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [
        "step_00000004.pt", "step_00000008.pt", "step_00000009.pt", "step_00000012.pt"]  # 9: where decay starts
    decayed_12 = load_file(str(ingested_project / WEIGHTS))

    messages = run(ingested_project, 20, 10, caplog)  # extend: 9 is the last step before the 12-step decay
    assert "resuming legal pretraining from step 9" in messages
    assert any("other-runs/" in m and "-steps12/" in m for m in messages)
    assert list((folder / "other-runs").glob("*-steps12/step_00000012.pt"))
    assert_same_run(outcome(ingested_project), planned_20)
    assert not torch.equal(decayed_12["embeddings.LayerNorm.weight"], planned_20[0]["embeddings.LayerNorm.weight"])

    messages = run(ingested_project, 17, 10, caplog)  # lower: 12 is before both decays (17: 12, 20: 15)
    assert "resuming legal pretraining from step 12" in messages
    assert_same_run(outcome(ingested_project), planned_17)


def test_the_checkpoint_where_decay_starts_outlives_keep_checkpoints(ingested_project: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    run(ingested_project, 12, 1, caplog)
    names = sorted(p.name for p in (ingested_project / CHECKPOINTS).glob("step_*.pt"))
    assert names == ["step_00000009.pt", "step_00000012.pt"]
    messages = run(ingested_project, 13, 1, caplog)  # decays from 9 (13 - ceil(3.25))
    assert "resuming legal pretraining from step 9" in messages
