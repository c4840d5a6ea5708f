"""The abmil protocol: gated-attention MIL (Ilse et al. 2018) on frozen instance embeddings,
beside mean pooling: it finds the one tile that decides a bag's label where the mean cannot,
is drawn from its seed alone, embeds each bag once with the encoder's own pooling, refuses
labeled rows that are not bags, and runs through finetune and evaluate on slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.core.config import FinetuneConfig, load_config
from ssl_models.core.errors import PipelineError
from tasks.cli import run_stage
from tasks.io import read_json
from tasks.mil import abmil_probe, abmil_steps, embed_bags
from tasks.probes import embed_rows, fit_chosen_probe, knn_probe, probe_predictions, scores
from tests.conftest import run_stages, tiny_params, write_params
from tests.ssl_models.histo_files import histo_params

CLASSES = ["absent", "present"]


def one_tile_bags(n_bags: int, seed: int, dim: int = 16, size: int = 8) -> tuple[list[np.ndarray], list[str]]:
    """Bags of `size` instances: background tiles, and one tile that a marker (e1 = 2) sets apart,
    whose e0 decides the label (+1: `present`, -1: `absent`). The background's e0 spreads widely
    (sd 1.5): in the mean of the bag the deciding tile's +-1/size drowns, one look at the marked
    tile reads it."""
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for index in range(n_bags):
        bag = rng.normal(0.0, 0.3, size=(size, dim)).astype(np.float32)
        bag[:, 0] = rng.normal(0.0, 1.5, size=size)
        present = index % 2 == 0
        marked = rng.integers(size)
        bag[marked, 0], bag[marked, 1] = (1.0 if present else -1.0), 2.0
        bags.append(bag)
        labels.append(CLASSES[int(present)])
    return bags, labels


def test_abmil_finds_the_one_tile_that_decides_the_label_where_mean_pooling_cannot() -> None:
    train_bags, train_y = one_tile_bags(64, seed=0)
    test_bags, test_y = one_tile_bags(64, seed=1)
    settings = FinetuneConfig(batch_size=16, max_steps=200)
    predicted, probabilities = abmil_probe(train_bags, train_y, test_bags, CLASSES, settings, seed=0)
    abmil = scores(test_y, predicted, probabilities, CLASSES)
    train_x, test_x = (np.stack([bag.mean(axis=0) for bag in bags]) for bags in (train_bags, test_bags))
    _, probe = fit_chosen_probe(train_x, train_y, settings)
    linear = scores(test_y, *probe_predictions(probe, train_y, test_x, CLASSES), CLASSES)
    knn = scores(test_y, *knn_probe(train_x, train_y, test_x, settings.knn_neighbors, CLASSES), CLASSES)
    assert abmil["macro_f1"] >= 0.95 and abmil["auroc"] >= 0.95, abmil
    assert linear["macro_f1"] <= 0.7 and knn["macro_f1"] <= 0.7, (linear, knn)


def test_abmil_is_drawn_from_its_seed_and_trains_by_the_step_rule() -> None:
    train_bags, train_y = one_tile_bags(24, seed=2)
    test_bags, _ = one_tile_bags(10, seed=3)
    settings = FinetuneConfig(batch_size=8, max_steps=30, abmil_epochs=4, abmil_hidden=16)
    assert abmil_steps(settings, 24) == 12 and abmil_steps(FinetuneConfig(max_steps=5), 1000) == 5
    torch.manual_seed(123)  # the global generator does not matter
    first = abmil_probe(train_bags, train_y, test_bags, CLASSES, settings, seed=7)
    torch.manual_seed(456)
    again = abmil_probe(train_bags, train_y, test_bags, CLASSES, settings, seed=7)
    other = abmil_probe(train_bags, train_y, test_bags, CLASSES, settings, seed=8)
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert first[1].shape == (10, 2) and np.allclose(first[1].sum(axis=1), 1.0)


def test_abmil_weights_classes_as_the_other_trained_protocols() -> None:
    """Bags that carry no information (all alike), 3 present among 27: the head learns the prior
    of its loss, even odds with balanced class weights (scikit-learn's, as the probe and
    fine-tuning use), the subset's 3/27 without."""
    bags = [np.ones((4, 8), dtype=np.float32)] * 27
    labels = ["present"] * 3 + ["absent"] * 24
    present = {weighting: abmil_probe(bags, labels, bags[:1], CLASSES, FinetuneConfig(
                   batch_size=27, max_steps=100, class_weight=weighting), seed=0)[1][0, 1]  # whole-subset batches
               for weighting in ("balanced", None)}
    assert present["balanced"] == pytest.approx(0.5, abs=0.03)
    assert present[None] == pytest.approx(3 / 27, abs=0.03)


def test_a_slide_bag_is_embedded_once_with_the_mean_the_probes_use(tmp_path: Path) -> None:
    from tests.ssl_models.test_histopathology_tiling import shards, write_slides

    _, labeled, _ = shards(tmp_path, write_slides(tmp_path), labeled_unit="slide", max_tiles_per_slide_bag=5)
    write_params(tmp_path, histo_params(preprocess={"labeled_unit": "slide"}))
    cfg, domain = load_config("histo", tmp_path / "params.yaml")
    torch.manual_seed(0)
    encoder = domain.build_encoder(cfg, tmp_path).eval()
    rows = [{"pixels": r["pixels"]} for r in labeled.to_list()]
    rows[1]["pixels"] = rows[1]["pixels"][:2]  # bags of different sizes
    pooled, instances = embed_bags(encoder, rows, batch_size=4)
    assert np.array_equal(pooled, embed_rows(encoder, rows, batch_size=4))  # linear and knn see the same
    assert [len(bag) for bag in instances] == [len(r["pixels"]) for r in rows]
    with torch.no_grad():
        alone = encoder(encoder.collate([{"pixels": [pixel]} for pixel in rows[1]["pixels"]])).numpy()
    assert np.allclose(instances[1], alone, atol=1e-5) and np.allclose(instances[1].mean(0), pooled[1], atol=1e-5)


def test_abmil_is_refused_where_labeled_rows_are_not_bags(tmp_path: Path) -> None:
    """Refused when params load, in every domain: before any stage has run."""
    write_params(tmp_path, histo_params(finetune={"protocols": ["linear", "abmil"]}))  # labeled_unit: tile
    with pytest.raises(PipelineError, match=r"domains.histo.finetune.protocols: abmil .* needs labeled rows that are "
                                            r"bags \(histopathology with preprocess.labeled_unit: slide\)"):
        load_config("histo", tmp_path / "params.yaml")
    write_params(tmp_path, tiny_params(finetune={"protocols": ["linear"], "generic_protocols": ["abmil"]}))
    with pytest.raises(PipelineError, match=r"domains.legal.finetune.protocols: abmil .* use linear, knn or finetune"):
        load_config("legal", tmp_path / "params.yaml")


def test_slides_run_abmil_through_finetune_and_evaluate(tmp_path: Path) -> None:
    write_params(tmp_path, histo_params(
        preprocess={"labeled_unit": "slide"},
        pretrain={"steps": 2, "checkpoint_every": 2, "warmup_steps": 1},
        finetune={"label_fractions": [1.0], "seeds": [0, 1], "protocols": ["linear", "abmil"],
                  "inits": ["ssl", "scratch"], "abmil_hidden": 16, "abmil_epochs": 5, "max_steps": 50,
                  "bootstrap_samples": 200}))
    run_stages(tmp_path, "histo", "default_data", "ingest", "preprocess", "pretrain")
    run_stage("finetune", "histo", tmp_path)
    results = read_json(tmp_path / "models/histo/finetune/results.json")
    abmil = [r for r in results["results"] if r["protocol"] == "abmil"]
    assert {(r["init"], r["seed"]) for r in abmil} == {("ssl", 0), ("ssl", 1), ("scratch", 0), ("scratch", 1)}
    n_slides = abmil[0]["n_train"]
    assert all(r["chosen"]["steps"] == -(-5 * n_slides // 8) and len(r["predicted"]) == r["n_test"] for r in abmil)
    run_stage("evaluate", "histo", tmp_path)
    metrics = read_json(tmp_path / "reports/histo/metrics.json")
    assert {(r["init"], r["protocol"]) for r in metrics["results"]} >= {("ssl", "abmil"), ("scratch", "abmil"),
                                                                        ("ssl", "linear")}
    assert set(metrics["summary"]["abmil"]["pct100"]) == {"ssl", "scratch"}
    comparisons = read_json(tmp_path / "reports/histo/evaluation/comparisons.json")
    assert any(c["protocol"] == "abmil" and c["against"] == "scratch" and c["interval"] for c in comparisons)
