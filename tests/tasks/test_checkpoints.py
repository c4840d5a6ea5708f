"""Checkpoints that mean what they say: a damaged or unverifiable one is never loaded, the
state loads with weights_only=True, a run resumes across cosmetic settings and starts over
(moving the old checkpoints aside) when its code changes, and the encoder is chosen among
kept candidates by the method's rule."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from ssl_models.core.domain import get_domain
from ssl_models.core.rankme import candidate_steps, choice_rule
from tasks.cli import run_stage
from tasks.io import read_json
from tasks.lineage import hash_outputs
from tests.conftest import tiny_params, write_params

from tests.tasks.test_pretrain import assert_identical, final_weights

CHECKPOINTS = "models/legal/checkpoints"


def resumed_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming legal")]


def test_a_damaged_or_unverifiable_checkpoint_is_never_loaded(ingested_project: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    run_stage("pretrain", "legal", ingested_project)  # 12 steps, checkpoints every 4, keeps 2: 8 and 12
    clean = final_weights(ingested_project)
    folder = ingested_project / CHECKPOINTS
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_00000008.pt", "step_00000012.pt"]
    state = torch.load(folder / "step_00000012.pt", map_location="cpu", weights_only=True)  # no pickle
    assert state["step"] == 12 and isinstance(state["rng"]["numpy"]["keys"], list)

    # a few flipped bytes in the newest checkpoint; leftovers of a dead writer and a live one's
    latest = folder / "step_00000012.pt"
    data = bytearray(latest.read_bytes())
    for offset in (len(data) // 3, len(data) // 2):
        data[offset] ^= 0xFF
    latest.write_bytes(bytes(data))
    dead = folder / f".step_00000016.pt.tmp-{2**22 + 12345}-0badc0de"
    live = folder / f".step_00000016.pt.tmp-{os.getppid()}-0badc0de"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    shutil.rmtree(ingested_project / "models/legal/pretrain")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        run_stage("pretrain", "legal", ingested_project)
    assert any("step_00000012.pt does not match its sha256" in r.getMessage() for r in caplog.records)
    assert resumed_from(caplog) == ["resuming legal pretraining from step 8"]
    assert (folder / "corrupt/step_00000012.pt").read_bytes() == bytes(data)  # kept aside, not deleted
    assert_identical(clean, final_weights(ingested_project))
    assert not dead.exists() and live.exists()
    live.unlink()

    # a checkpoint without its checksum manifest is not trusted either
    (folder / "step_00000012.pt.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        run_stage("pretrain", "legal", ingested_project)
    assert any("has no readable checksum manifest" in r.getMessage() for r in caplog.records)
    assert resumed_from(caplog) == ["resuming legal pretraining from step 8"]
    assert_identical(clean, final_weights(ingested_project))
    assert not list(folder.glob(".*.tmp-*"))


def test_cosmetic_settings_resume_and_a_code_change_starts_over(ingested_project: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path_factory: pytest.TempPathFactory,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import tasks.checkpoints

    extra = tmp_path_factory.mktemp("code") / "objective.py"  # stands for a file of the method's code
    extra.write_text("SCALE = 1.0\n")
    code_files = tasks.checkpoints.code_files
    monkeypatch.setattr(tasks.checkpoints, "code_files", lambda domain: [*code_files(domain), extra])
    threads = torch.get_num_threads()
    run_stage("pretrain", "legal", ingested_project)
    first = final_weights(ingested_project)
    folder = ingested_project / CHECKPOINTS

    cosmetic = {"rankme_samples": 16, "keep_checkpoints": 3, "keep_candidates": 4, "checkpoint_choice": "last",
                "num_workers": 0, "log_every": 3}
    write_params(ingested_project, tiny_params(pretrain=cosmetic, cpu_threads=1))
    extra.write_text("# a comment and a docstring change no result\n'''Scales.'''\nSCALE = 1.0\n")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        run_stage("pretrain", "legal", ingested_project)
    assert resumed_from(caplog) == ["resuming legal pretraining from step 12"]
    assert not (folder / "other-runs").exists()

    write_params(ingested_project, tiny_params())  # the first run's settings (threads change float sums)
    torch.set_num_threads(threads)
    extra.write_text("SCALE = 2.0\n")  # the code changed: its checkpoints may not be resumed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        run_stage("pretrain", "legal", ingested_project)
    assert resumed_from(caplog) == []
    moved = [r.getMessage() for r in caplog.records if "another configuration or code" in r.getMessage()]
    assert len(moved) == 2  # one line for the checkpoints, one for their candidate encoders
    aside = list((folder / "other-runs").iterdir())
    assert len(aside) == 1 and len(aside[0].name) == 12
    assert sorted(p.name for p in aside[0].glob("step_*.pt")) == ["step_00000008.pt", "step_00000012.pt"]
    assert list((aside[0] / "candidates").glob("step_*"))
    assert_identical(first, final_weights(ingested_project))  # started over (the file changes no weight here)


def test_the_encoder_is_the_chosen_candidate_and_candidates_survive_a_resume(ingested_project: Path) -> None:
    write_params(ingested_project, tiny_params(pretrain={"steps": 16, "checkpoint_choice": "rankme",
                                                         "keep_candidates": 3}))
    run_stage("pretrain", "legal", ingested_project)
    out = ingested_project / "models/legal/pretrain"
    log = read_json(out / "log.json")
    logged = log["checkpoints"]
    best = max(logged, key=lambda c: (c["rankme"], c["step"]))
    assert log["choice"]["rule"] == "rankme" and log["choice"]["step"] == best["step"]
    kept = sorted(int(p.name.split("_")[1]) for p in (out / "candidates").iterdir())
    assert kept == sorted({4, 16, best["step"]})  # two spread over 4..16 (the first, the last) + the best
    assert hash_outputs(out / "encoder") == hash_outputs(out / "candidates" / f"step_{best['step']:08d}")
    first = hash_outputs(out)

    shutil.rmtree(out)  # the re-run resumes at the end: the candidates come from the checkpoints folder
    run_stage("pretrain", "legal", ingested_project)
    assert hash_outputs(out) == first


def test_the_rule_per_method_covers_every_registered_method() -> None:
    rules: dict[str, set[str]] = {"rankme": set(), "last": set()}
    for module in ("legal_text", "audio", "histopathology", "medical3d"):
        methods = get_domain(module).methods
        for name in methods.names():
            rules[choice_rule("auto", name, methods.get(name).checkpoint_rule)[0]].add(name)
    assert rules["rankme"] == {"simclr", "vicreg", "byol", "barlow_twins", "dino"}  # the joint-embedding classes declare it
    assert {"mae", "mlm", "tera", "masked_spectrogram", "hubert"} <= rules["last"]
    assert choice_rule("rankme", "mlm", "last")[0] == "rankme" and choice_rule("last", "simclr", "rankme")[0] == "last"
    assert choice_rule("auto", "simclr", "rankme")[1] == (
        "simclr is a joint-embedding method: the logged checkpoint of highest RankMe (label-free, Garrido et al. 2023)")
    assert choice_rule("auto", "mlm", "last")[1] == (
        "mlm is a reconstruction or masked-prediction objective, where RankMe is not validated (Garrido et al. 2023): "
        "the last checkpoint")


def test_candidates_are_spread_evenly_and_hold_the_last_and_the_best() -> None:
    logged = list(range(10, 110, 10))
    history = [{"step": s, "rankme": 5.0 if s == 30 else 1.0} for s in logged[:6]]
    assert candidate_steps(logged, 4, history) == {10, 50, 100, 30}
    nine = candidate_steps(logged, 10, [])
    assert len(nine) == 9 and {10, 100} <= nine
    assert candidate_steps(logged, 1, history) == {100, 30}
    assert candidate_steps(logged[:3], 10, history[:3]) == {10, 20, 30}


def test_a_kill_between_the_manifest_and_the_rename_leaves_the_older_checkpoint_in_charge(tmp_path: Path) -> None:
    from tasks.checkpoints import Plan, load_checkpoint, save_checkpoint, sort_checkpoints

    plan = Plan(steps=10, decay_start=8)
    for step in (2, 4, 6, 8, 9):
        save_checkpoint(tmp_path, {"step": step, "fingerprint": "f" * 64, "weight": torch.full((3,), float(step))},
                        plan, keep=1)
    # the newest one, and the one where the decay starts (a longer plan resumes from it)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000008.pt", "step_00000009.pt"]
    # killed after writing step 10's manifest, before renaming its file in
    (tmp_path / "step_00000010.pt.json").write_text('{"step": 10}')
    (tmp_path / f".step_00000010.pt.tmp-{2**22 + 1}-00ff00ff").write_bytes(b"half a checkpoint")
    assert sort_checkpoints(tmp_path, "f" * 64, plan) is None
    assert not list(tmp_path.glob(".*")) and not (tmp_path / "step_00000010.pt.json").exists()
    state = load_checkpoint(tmp_path, "f" * 64, plan, tidy=True)
    assert state is not None and state["step"] == 9 and torch.equal(state["weight"], torch.full((3,), 9.0))
