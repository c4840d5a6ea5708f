"""finetune/checkpoint_choice.json: how well RankMe tracked a linear probe on the pool's
validation labels across pretrain's candidate encoders, and what the chosen step gained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from ssl_models.core.config import DomainConfig
from tasks.stages.finetune import finetune
from tasks.io import read_json, write_json
from tasks.paths import DomainPaths
from tasks.probes import fit_chosen_probe, scores
from tests.tasks.test_finetune import (
    DIM,
    FakeDomain,
    VectorEncoder,
    fake_project,
    labeled_rows,
)

# candidate weights: collapsed, noise only, every class coordinate, two of the three
KEEP_TWO = torch.eye(DIM)
KEEP_TWO[2, 2] = 0.0
NOISE_ONLY = torch.eye(DIM)
NOISE_ONLY[:3, :3] = 0.0
CANDIDATES = {10: torch.zeros(DIM, DIM), 20: NOISE_ONLY, 30: torch.eye(DIM), 40: KEEP_TWO}
RANKME = {10: 1.0, 20: 3.0, 30: 5.0, 40: 4.0}


RANKME_CHOICE = {"rule": "rankme", "step": 30, "reason": "highest RankMe"}


def project_with_candidates(root: Path, rows: list[dict[str, Any]], steps: list[int],
                            choice: dict[str, Any] | None = RANKME_CHOICE) -> tuple[DomainConfig, DomainPaths]:
    """A fake project whose pretrain folder holds the candidates of `steps` and a log with
    their RankMe (and `choice`, unless None); finetune runs one quick linear job."""
    cfg, paths = fake_project(root, rows, label_fractions=[1.0], seeds=[0], inits=["ssl"], protocols=["linear"])
    for step in steps:
        VectorEncoder(CANDIDATES[step]).save(paths.pretrain / "candidates" / f"step_{step:08d}")
    history = {"loss": [1.0] * len(RANKME), "rankme_rows": "val",
               "checkpoints": [{"step": s, "loss": 1.0, "rankme": r, "learning_rate": 0.001} for s, r in RANKME.items()]}
    if choice is not None:
        history["choice"] = dict(choice)
    write_json(paths.pretrain / "log.json", history)
    return cfg, paths


def test_rankme_is_correlated_with_the_val_score_of_each_candidate(tmp_path: Path) -> None:
    rows = labeled_rows()
    cfg, paths = project_with_candidates(tmp_path, rows, [10, 20, 30, 40])
    domain = FakeDomain()
    finetune(cfg, domain, paths)
    record = read_json(paths.finetune / "checkpoint_choice.json")
    assert (record["rule"], record["chosen_step"], record["last_step"], record["metric"]) == (
        "rankme", 30, 40, "macro_f1")
    assert [(c["step"], c["rankme"]) for c in record["candidates"]] == list(RANKME.items())
    val = {c["step"]: c["val_score"] for c in record["candidates"]}
    assert val[30] > val[20] and val[30] > val[10] and val[30] >= val[40]  # the informative encoder scores best
    assert val[10] < 0.4 and val[30] > 0.7
    expected = spearmanr(list(RANKME.values()), [val[s] for s in RANKME]).statistic
    assert record["spearman"] == expected and record["spearman"] > 0
    assert record["gain_vs_last"] == val[30] - val[40]
    # each candidate folder loaded once, as the ssl encoder, beside the chosen encoder of the job
    candidate_loads = [d for init, d in domain.loaded if d.parent.name == "candidates"]
    assert {init for init, _ in domain.loaded} == {"ssl"} and sorted(d.name for d in candidate_loads) == [
        f"step_{s:08d}" for s in (10, 20, 30, 40)]
    # the score is a probe fitted on the pool's train rows and scored on its val rows
    train = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    x_train, x_val = (np.array([r["x"] for r in part], dtype=np.float32) for part in (train, val_rows))
    _, probe = fit_chosen_probe(x_train, [r["label"] for r in train], cfg.finetune)
    predicted = list(probe.predict(x_val))
    assert val[30] == scores([r["label"] for r in val_rows], predicted, probe.predict_proba(x_val),
                             sorted({r["label"] for r in rows}))["macro_f1"]


def test_test_rows_never_enter_the_tracking(tmp_path: Path) -> None:
    rows = labeled_rows()
    garbled = [dict(r, x=list(np.random.default_rng(i).normal(size=DIM) * 9), label=rows[(i + 1) % len(rows)]["label"])
               if r["split"] == "test" else r for i, r in enumerate(rows)]
    records = []
    for name, variant in (("original", rows), ("garbled", garbled)):
        cfg, paths = project_with_candidates(tmp_path / name, variant, [10, 20, 30, 40])
        finetune(cfg, FakeDomain(), paths)
        records.append(read_json(paths.finetune / "checkpoint_choice.json"))
    assert records[0] == records[1] and records[0]["spearman"] is not None


def test_too_few_candidates_give_nulls_with_the_reason(tmp_path: Path) -> None:
    cfg, paths = project_with_candidates(tmp_path, labeled_rows(), [30, 40])
    domain = FakeDomain()
    finetune(cfg, domain, paths)
    record = read_json(paths.finetune / "checkpoint_choice.json")
    assert record["spearman"] is None and record["gain_vs_last"] is None
    assert [c["val_score"] for c in record["candidates"]] == [None, None]
    assert "2 candidate encoder(s)" in record["note"] and "at least 3" in record["note"]
    assert not [d for _, d in domain.loaded if d.parent.name == "candidates"]  # nothing embedded for nothing


def test_without_val_labels_nothing_is_scored_and_the_note_says_so(tmp_path: Path) -> None:
    rows = [dict(r, split="train") if r["split"] == "val" else r for r in labeled_rows()]
    cfg, paths = project_with_candidates(tmp_path, rows, [10, 20, 30], choice=None)
    finetune(cfg, FakeDomain(), paths)
    record = read_json(paths.finetune / "checkpoint_choice.json")
    assert record["spearman"] is None and all(c["val_score"] is None for c in record["candidates"])
    assert "no val-split rows" in record["note"]
    # no choice in the log: the encoder is the last checkpoint, and the note says it was assumed
    assert (record["rule"], record["chosen_step"], record["last_step"]) == ("last", 40, 40)
    assert "records no choice" in record["note"]
