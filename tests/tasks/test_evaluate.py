from __future__ import annotations

import numpy as np

from tasks.evaluate import aggregate, flat_summary, paired_differences, primary_metric, verdict
from tasks.probes import scores


def fake_results() -> list[dict]:
    rows = []
    for seed, (ssl, scratch) in enumerate([(0.60, 0.50), (0.70, 0.55), (0.65, 0.52)]):
        for init, value in (("ssl", ssl), ("scratch", scratch)):
            rows.append({"init": init, "protocol": "linear", "label_fraction": 0.1, "seed": seed,
                         "macro_f1": value, "accuracy": value + 0.1, "n_train": 20, "n_test": 50})
    return rows


def test_aggregate_follows_the_shared_metrics_schema() -> None:
    summary = aggregate(fake_results())
    row = next(r for r in summary if r["init"] == "ssl" and r["metric"] == "macro_f1")
    assert set(row) >= {"init", "protocol", "label_fraction", "metric", "mean", "std", "n_seeds", "n_test"}
    assert row["mean"] == 0.65 and row["n_seeds"] == 3 and row["n_test"] == 50
    assert row["std"] == round(float(np.std([0.6, 0.7, 0.65], ddof=1)), 4)
    assert flat_summary(summary, "macro_f1")["linear"]["pct10"] == {"scratch": 0.5233, "ssl": 0.65}


def test_paired_differences_are_per_seed() -> None:
    (comparison,) = paired_differences(fake_results(), "macro_f1")
    assert comparison["baseline"] == "scratch"
    assert comparison["mean_difference"] == round((0.10 + 0.15 + 0.13) / 3, 4)
    assert comparison["ssl_wins"] == 3 and comparison["verdict"] == "better"


def test_verdict_needs_every_seed_to_agree() -> None:
    assert verdict(np.array([0.1, 0.2, -0.01])) == "no clear difference"
    assert verdict(np.array([-0.1, -0.2, -0.01])) == "worse"


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
