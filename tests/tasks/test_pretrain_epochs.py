"""`pretrain.epochs`: the run sized to the corpus (passes over the train rows), `steps` its cap;
one planned number for the schedule, the checkpoints, the logs and the lineage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_models.core.config import PretrainConfig, load_config
from ssl_models.core.errors import PipelineError
from tasks.cli import run_stage
from tasks.io import read_json
from tasks.paths import DomainPaths
from tests.conftest import tiny_params, write_params

WEIGHTS = "models/legal/pretrain/encoder/model.safetensors"


def test_epochs_size_the_steps_and_steps_cap_them() -> None:
    assert PretrainConfig(steps=1000, batch_size=32).planned_steps(17_387) == 1000  # no epochs: steps
    assert PretrainConfig(steps=1000, batch_size=32, epochs=1).planned_steps(17_387) == 544  # ceil(17387 / 32)
    assert PretrainConfig(steps=1000, batch_size=32, epochs=0.5).planned_steps(17_387) == 272
    assert PretrainConfig(steps=100, batch_size=32, epochs=3).planned_steps(17_387) == 100  # the cap
    assert PretrainConfig(steps=100, batch_size=32, epochs=0.01).planned_steps(10) == 1  # at least one step


def test_settings_sized_to_the_corpus_fit_their_warmup_and_are_sized_once() -> None:
    given = PretrainConfig(steps=1000, batch_size=32, epochs=1, warmup_steps=50, checkpoint_every=100)
    assert given.for_corpus(100_000) is given  # the cap holds: nothing changes
    sized = given.for_corpus(3_200)  # 100 steps: a warmup of 50 still fits
    assert (sized.steps, sized.warmup_steps, sized.checkpoint_every) == (100, 50, 100)
    short = given.for_corpus(320)  # 10 steps: the warmup keeps its 5% of the plan
    assert (short.steps, short.warmup_steps) == (10, 0)
    assert given.for_corpus(1_600).warmup_steps == 50 * 50 // 1000
    assert short.for_corpus(320) == short and sized.for_corpus(3_200) == sized
    plain = PretrainConfig(steps=300)
    assert plain.for_corpus(10) is plain  # without epochs every run is as before


@pytest.mark.parametrize("epochs", [0, -1.0])
def test_epochs_must_be_positive_in_one_line(tmp_path: Path, epochs: float) -> None:
    write_params(tmp_path, tiny_params(pretrain={"epochs": epochs}))
    with pytest.raises(PipelineError, match=r"domains\.legal\.pretrain\.epochs: must be null or positive") as error:
        load_config("legal", tmp_path / "params.yaml")
    assert "\n" not in str(error.value)


def test_a_run_sized_by_epochs_is_the_run_of_its_planned_steps(ingested_project: Path) -> None:
    cfg, domain = load_config("legal", ingested_project / "params.yaml")
    train_rows = len(domain.pretrain_dataset(DomainPaths("legal", ingested_project).shards, "train"))
    planned = math.ceil(0.02 * train_rows / 8)  # 2% of an epoch at batch 8
    assert 4 < planned < 100
    write_params(ingested_project, tiny_params(pretrain={"epochs": 0.02, "steps": 100, "checkpoint_every": 4}))
    history = run_stage("pretrain", "legal", ingested_project)
    logged = list(range(4, planned + 1, 4))
    assert [c["step"] for c in history["checkpoints"]] == logged + ([planned] if logged[-1] != planned else [])
    assert history["planned_steps"] == planned and history["loss"][-1][0] == planned
    record = read_json(ingested_project / "models/legal/pretrain/lineage.json")
    assert record["params"]["planned_steps"] == planned
    assert record["params"]["pretrain"]["steps"] == 100 and record["params"]["pretrain"]["epochs"] == 0.02
    manifests = sorted((ingested_project / "models/legal/checkpoints").glob("step_*.pt.json"))
    assert {json.loads(m.read_text())["planned_steps"] for m in manifests} == {planned}
    sized = load_file(str(ingested_project / WEIGHTS))

    # the same steps asked for directly: the same schedule, the same weights
    shutil.rmtree(ingested_project / "models")
    write_params(ingested_project, tiny_params(pretrain={"steps": planned, "checkpoint_every": 4}))
    run_stage("pretrain", "legal", ingested_project)
    direct = load_file(str(ingested_project / WEIGHTS))
    assert all(torch.equal(sized[name], direct[name]) for name in direct)

    # re-run with nothing changed: resumes at the end of its plan, no step more
    write_params(ingested_project, tiny_params(pretrain={"epochs": 0.02, "steps": 100, "checkpoint_every": 4}))
    shutil.rmtree(ingested_project / "models")
    run_stage("pretrain", "legal", ingested_project)
    checkpoints = ingested_project / "models/legal/checkpoints"
    written = {path.name: path.stat().st_mtime_ns for path in checkpoints.glob("step_*")}
    again = run_stage("pretrain", "legal", ingested_project)
    assert again["checkpoints"] == history["checkpoints"] and again["loss"][-1][0] == planned
    # resumed at its last checkpoint: no checkpoint trained or written again (a fresh run would rewrite them)
    assert {path.name: path.stat().st_mtime_ns for path in checkpoints.glob("step_*")} == written
