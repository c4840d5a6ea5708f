from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from ssl_models.core.config import load_config
from tasks.stages.evaluate import (
    Bootstrap,
    aggregate,
    comparison_metric,
    evaluate,
    flat_summary,
    paired_differences,
    primary_metric,
    resampled_test_rows,
    scores_of_predictions,
    verdict,
)
from tasks.io import read_json, write_json, write_jsonl
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.probes import scores
from tests.conftest import tiny_params, write_params

CLASSES = ["employment", "licence", "lease", "privacy"]


def fake_results() -> list[dict]:
    rows = []
    for seed, (ssl, scratch) in enumerate([(0.60, 0.50), (0.70, 0.55), (0.65, 0.52)]):
        for init, value in (("ssl", ssl), ("scratch", scratch)):
            rows.append({"init": init, "protocol": "linear", "label_fraction": 0.1, "seed": seed,
                         "macro_f1": value, "accuracy": value + 0.1, "n_train": 20, "n_groups": 7, "n_test": 50})
    return rows


def synthetic_finetune(quality: dict[tuple[str, str], float | list[float]], fractions: tuple[float, ...] = (0.1, 1.0),
                       n_test: int = 160, seeds: tuple[int, ...] = (0, 1, 2),
                       small_seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
                       predictions: bool = True) -> dict:
    """A results.json as the finetune stage writes it: each (init, protocol) gets a share of
    correct test predictions (`quality`, per fraction a little higher with more labels; a list
    gives one share per seed), the rest a wrong class; scores from those predictions."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), n_test)
    rows = []
    for (init, protocol), share in quality.items():
        for fraction in fractions:
            for position, seed in enumerate(small_seeds if fraction < 0.1 else seeds):
                run = np.random.default_rng([seed, zlib.crc32(f"{init}/{protocol}/{fraction}".encode())])
                level = (share[position % len(share)] if isinstance(share, list) else share) + 0.05 * fraction
                correct = run.random(n_test) < level
                predicted = np.where(correct, labels, (labels + run.integers(1, len(CLASSES), n_test)) % len(CLASSES))
                row = {"init": init, "protocol": protocol, "label_fraction": fraction, "seed": seed,
                       "n_train": round(1834 * fraction), "n_groups": max(4, round(400 * fraction)), "n_test": n_test,
                       "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
                       "accuracy": float(accuracy_score(labels, predicted)),
                       "chosen": {"linear_c": 0.1 if protocol == "linear" else None,
                                  "steps": 40 if protocol == "finetune" else None}}
                if predictions:
                    row["predicted"] = predicted.tolist()
                rows.append(row)
    finetuned = {"classes": CLASSES, "inits": sorted({i for i, _ in quality}), "results": rows}
    if predictions:
        finetuned.update(test_labels=labels.tolist(), test_groups=[f"g{i % 40}" for i in range(n_test)])
    return finetuned


def project_with_finetune_outputs(root: Path, finetuned: dict, extras: bool = True, bootstrap_samples: int = 300,
                                  checkpoint_rule: str = "rankme") -> tuple:
    """A tiny legal project whose upstream stages 'ran': results.json (and, with `extras`,
    embedding_2d.json and checkpoint_choice.json), the pretrain log, shard and manifest
    summaries, each folder with its lineage record. Returns (cfg, domain, paths)."""
    write_params(root, tiny_params(finetune={"bootstrap_samples": bootstrap_samples}))
    cfg, domain = load_config("legal", root / "params.yaml")
    paths = DomainPaths("legal", root)
    n_test = len(finetuned.get("test_labels") or [0] * finetuned["results"][0]["n_test"])
    for folder in (paths.finetune, paths.pretrain, paths.shards, paths.manifest):
        folder.mkdir(parents=True)
    write_json(paths.finetune / "results.json", finetuned)
    if extras:
        rng = np.random.default_rng(1)
        labels = finetuned["test_labels"]
        offset = 3 * np.array(labels)[:, None]
        write_json(paths.finetune / "embedding_2d.json", {
            "labels": labels, "method": "pca",
            # labels separate along the diagonal except for the random encoder
            "inits": {init: (rng.normal(size=(n_test, 2)) + offset * (init != "scratch")).tolist()
                      for init in finetuned["inits"]}})
        candidates = [{"step": s, "rankme": 10 + s / 10, "val_score": 0.3 + s / 1000} for s in (40, 80, 120, 160)]
        write_json(paths.finetune / "checkpoint_choice.json", {
            "rule": checkpoint_rule, "chosen_step": 120 if checkpoint_rule == "rankme" else 160, "last_step": 160,
            "metric": "macro_f1", "candidates": candidates, "spearman": 0.8, "gain_vs_last": -0.012,
            "note": "linear probe on the pool's train-split rows, scored on its val-split rows"})
    steps = list(range(1, 161))
    write_json(paths.pretrain / "log.json", {
        "loss": [[s, 6 - s / 40] for s in steps],
        "checkpoints": [{"step": s, "loss": 6 - s / 40, "rankme": 10 + s / 10, "learning_rate": 1e-3}
                        for s in (40, 80, 120, 160)],
        "rankme_rows": "val",
        "choice": {"rule": checkpoint_rule, "step": 120 if checkpoint_rule == "rankme" else 160,
                   "reason": "joint-embedding method: RankMe" if checkpoint_rule == "rankme"
                   else "mlm reconstructs its input: RankMe is not validated there"}})
    write_json(paths.shards / "summary.json", {"labeled_test": n_test, "labeled_test_exact_copies_in_pretraining": 0})
    write_json(paths.manifest / "summary.json", {"records": 2400, "files": 2400, "quarantined": 0,
                                                 "duplicates_dropped": 3, "labeled": 2270,
                                                 "labeled_by_split": {"train": 1834, "val": 0, "test": n_test}})
    write_jsonl(paths.manifest / "quarantine.jsonl", [])
    for stage, folder in (("ingest", paths.manifest), ("preprocess", paths.shards), ("pretrain", paths.pretrain),
                          ("finetune", paths.finetune)):
        LineageRecorder(f"{stage}@legal", folder, root=root, params={}).write()
    return cfg, domain, paths


def test_aggregate_follows_the_shared_metrics_schema() -> None:
    summary = aggregate(fake_results())
    row = next(r for r in summary if r["init"] == "ssl" and r["metric"] == "macro_f1")
    assert set(row) >= {"init", "protocol", "label_fraction", "metric", "mean", "std", "n_seeds", "n_test",
                        "n_train", "n_groups"}
    assert row["mean"] == 0.65 and row["n_seeds"] == 3 and row["n_test"] == 50 and row["n_groups"] == 7
    assert row["std"] == round(float(np.std([0.6, 0.7, 0.65], ddof=1)), 4)
    assert flat_summary(summary, "macro_f1")["linear"]["pct10"] == {"scratch": 0.5233, "ssl": 0.65}


def test_without_predictions_differences_are_per_seed_and_have_no_interval() -> None:
    comparisons = paired_differences(fake_results(), "macro_f1")
    assert {(c["against"], c["protocol"]) for c in comparisons} == {("scratch", "linear"), ("scratch", "best")}
    for comparison in comparisons:
        assert comparison["mean_difference"] == round((0.10 + 0.15 + 0.13) / 3, 4)
        assert comparison["ssl_wins"] == 3 and comparison["verdict"] == "better" and comparison["interval"] is None


def test_verdict_needs_every_seed_to_agree() -> None:
    assert verdict(np.array([0.1, 0.2, -0.01])) == "no clear difference"
    assert verdict(np.array([-0.1, -0.2, -0.01])) == "worse"


def test_resampled_macro_f1_and_accuracy_are_scikit_learns() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 90)
    predicted = np.where(rng.random(90) < 0.5, labels, rng.integers(0, 5, 90))
    predicted[predicted == 4] = 3  # a class never predicted: it still counts (F1 0) where it is a label
    rows = resampled_test_rows(90, 40, seed=0)
    f1 = scores_of_predictions(labels, predicted, rows, 5, "macro_f1")
    accuracy = scores_of_predictions(labels, predicted, rows, 5, "accuracy")
    for b in range(40):
        assert f1[b] == pytest.approx(f1_score(labels[rows[b]], predicted[rows[b]], average="macro", zero_division=0))
        assert accuracy[b] == pytest.approx(accuracy_score(labels[rows[b]], predicted[rows[b]]))
    identity = np.arange(90)[None, :]
    assert scores_of_predictions(labels, predicted, identity, 5, "macro_f1")[0] == pytest.approx(
        f1_score(labels, predicted, average="macro", zero_division=0))


def bootstrap_of(finetuned: dict, samples: int = 400) -> Bootstrap:
    return Bootstrap(finetuned, "macro_f1", samples, 0.95, seed=0)


def test_the_interval_excludes_zero_only_for_a_real_difference() -> None:
    finetuned = synthetic_finetune({("ssl", "linear"): 0.8, ("scratch", "linear"): 0.4, ("baseline", "linear"): 0.8})
    finetuned["results"] += [{**r, "init": "generic"} for r in finetuned["results"] if r["init"] == "ssl"]
    comparisons = paired_differences(finetuned["results"], "macro_f1", bootstrap_of(finetuned))
    by = {(c["against"], c["protocol"], c["label_fraction"]): c for c in comparisons}
    scratch = by[("scratch", "linear", 0.1)]
    low, high = scratch["interval"]
    assert scratch["verdict"] == "better" and 0 < low < scratch["mean_difference"] < high
    baseline = by[("baseline", "linear", 0.1)]  # the same accuracy, other predictions
    assert baseline["verdict"] == "no clear difference" and baseline["interval"][0] < 0 < baseline["interval"][1]
    assert by[("generic", "linear", 0.1)]["interval"] == [0.0, 0.0]  # identical predictions: no spread at all
    again = paired_differences(finetuned["results"], "macro_f1", bootstrap_of(finetuned))
    assert again == comparisons  # seeded: the same intervals every run


def test_the_interval_resamples_seeds_as_well_as_test_rows() -> None:
    steady = synthetic_finetune({("ssl", "linear"): 0.6, ("scratch", "linear"): 0.6}, fractions=(1.0,))
    shaky = synthetic_finetune({("ssl", "linear"): [0.95, 0.25, 0.6], ("scratch", "linear"): 0.6}, fractions=(1.0,))

    def width(finetuned: dict) -> float:
        (row,) = [c for c in paired_differences(finetuned["results"], "macro_f1", bootstrap_of(finetuned))
                  if c["protocol"] == "linear"]
        return row["interval"][1] - row["interval"][0]

    assert width(shaky) > 2 * width(steady)


def test_best_protocol_against_best_protocol_and_per_protocol_where_both_ran() -> None:
    finetuned = synthetic_finetune({("ssl", "linear"): 0.45, ("ssl", "finetune"): 0.85, ("baseline", "linear"): 0.65},
                                   fractions=(1.0,))
    comparisons = paired_differences(finetuned["results"], "macro_f1", bootstrap_of(finetuned))
    per_protocol = [c for c in comparisons if c["protocol"] != "best"]
    assert [(c["against"], c["protocol"], c["verdict"]) for c in per_protocol] == [("baseline", "linear", "worse")]
    (best,) = [c for c in comparisons if c["protocol"] == "best"]
    assert (best["ssl_protocol"], best["against_protocol"], best["verdict"]) == ("finetune", "linear", "better")


def test_two_classes_are_judged_by_auroc_more_by_macro_f1() -> None:
    classes = ["mass", "normal"]
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    # the threshold puts one positive on the wrong side, the ranking is perfect
    result = scores(["mass", "mass", "mass", "normal"], ["mass", "mass", "normal", "normal"], probabilities, classes)
    assert result["auroc"] == 1.0 and result["accuracy"] == 0.75
    rows = [{**row, "auroc": row["macro_f1"]} for row in fake_results()]
    assert primary_metric(classes, rows) == "auroc"
    assert primary_metric(["a", "b", "c"], rows) == "macro_f1"
    assert primary_metric(classes, fake_results()) == "macro_f1"  # no AUROC (a class missing from the test set)
    # intervals need scores from predictions: AUROC's probabilities are not kept, macro-F1 stands in
    assert comparison_metric("auroc", with_predictions=True) == "macro_f1"
    assert comparison_metric("auroc", with_predictions=False) == "auroc"


def numeric_leaves(tree: dict) -> list:
    return [leaf for value in tree.values()
            for leaf in (numeric_leaves(value) if isinstance(value, dict) else [value])]


def test_the_stage_writes_intervals_dvc_can_list_and_passes_figures_data_on(tmp_path: Path) -> None:
    finetuned = synthetic_finetune({("ssl", "linear"): 0.8, ("ssl", "knn"): 0.7, ("scratch", "linear"): 0.4,
                                    ("scratch", "knn"): 0.4, ("baseline", "linear"): 0.6}, fractions=(0.01, 1.0))
    cfg, domain, paths = project_with_finetune_outputs(tmp_path, finetuned)
    metrics = evaluate(cfg, domain, paths)
    assert read_json(paths.metrics) == metrics == read_json(paths.evaluation / "metrics.json")
    assert metrics["comparison_metric"] == "macro_f1" and metrics["confidence"] == 0.95
    seeds = {r["label_fraction"]: r["n_seeds"] for r in metrics["results"]}
    assert seeds == {0.01: 5, 1.0: 3}
    paired = metrics["paired"]["pct1"]["ssl_vs_baseline"]
    assert paired["low"] > 0 and set(metrics["paired"]["pct100"]) == {"ssl_vs_scratch", "ssl_vs_baseline"}
    best = {(r["init"], r["label_fraction"]): r["protocol"] for r in metrics["best_protocols"]}
    assert best[("ssl", 1.0)] == "linear" and best[("baseline", 1.0)] == "linear" and len(best) == 6
    assert metrics["best"]["pct100"]["ssl"] == metrics["summary"]["linear"]["pct100"]["ssl"]
    leaves = numeric_leaves(metrics["paired"]) + numeric_leaves(metrics["summary"]) + numeric_leaves(metrics["best"])
    assert leaves and all(isinstance(v, (int, float)) for v in leaves)
    assert metrics["summary"]["linear"]["pct100"].keys() == {"ssl", "scratch", "baseline"}
    assert "baseline" not in metrics["summary"]["knn"]["pct100"]
    embedding = read_json(paths.evaluation / "embedding_2d.json")
    assert embedding["classes"] == CLASSES and set(embedding["inits"]) == {"ssl", "scratch", "baseline"}
    assert read_json(paths.evaluation / "checkpoint_choice.json")["chosen_step"] == 120
    assert all("predicted" not in r for r in read_json(paths.evaluation / "results_per_seed.json"))
    assert (paths.plots / "label_efficiency.csv").read_text().splitlines()[0] == (
        "label_fraction,baseline_linear,scratch_knn,scratch_linear,ssl_knn,ssl_linear")


def test_the_stage_still_runs_on_results_without_predictions(tmp_path: Path) -> None:
    finetuned = synthetic_finetune({("ssl", "linear"): 0.8, ("scratch", "linear"): 0.4}, predictions=False)
    for row in finetuned["results"]:
        del row["n_groups"], row["chosen"]  # an older finetune stage's rows
    cfg, domain, paths = project_with_finetune_outputs(tmp_path, finetuned, extras=False)
    metrics = evaluate(cfg, domain, paths)
    assert "confidence" not in metrics and metrics["paired"]["pct10"]["ssl_vs_scratch"].keys() == {"difference"}
    assert all(c["interval"] is None for c in read_json(paths.evaluation / "comparisons.json"))
    assert not (paths.evaluation / "embedding_2d.json").exists()
