"""evaluate: results over seeds -> metrics.json (the schema every domain shares), paired
comparisons of `ssl` against `scratch` and `generic`, and data for DVC plots."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain
from tasks.io import atomic_dir, read_json, write_json
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths

log = logging.getLogger("evaluate")
METRICS = ("auroc", "macro_f1", "accuracy")


def primary_metric(classes: list[str], results: list[dict[str, Any]]) -> str:
    """AUROC for two classes (threshold-free, fair to imbalanced sets), macro-F1 otherwise."""
    if len(classes) == 2 and results and all("auroc" in r for r in results):
        return "auroc"
    return "macro_f1"


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mean and std over seeds per (init, protocol, label fraction, metric)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in results:
        groups[(row["init"], row["protocol"], row["label_fraction"])].append(row)
    summary = []
    for (init, protocol, fraction), rows in sorted(groups.items()):
        for metric in (m for m in METRICS if all(m in r for r in rows)):
            values = np.array([r[metric] for r in rows])
            summary.append({"init": init, "protocol": protocol, "label_fraction": fraction, "metric": metric,
                            "mean": round(float(values.mean()), 4),
                            "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
                            "n_seeds": len(values), "n_test": rows[0]["n_test"],
                            "n_train": int(np.mean([r["n_train"] for r in rows]))})
    return summary


def flat_summary(summary: list[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """Primary-metric means as protocol -> pct<labels> -> init, the nesting `dvc metrics show`
    and `dvc exp show` flatten into columns such as `summary.linear.pct10.ssl`."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in summary:
        if row["metric"] == metric:
            table[row["protocol"]][f"pct{100 * row['label_fraction']:g}"][row["init"]] = row["mean"]
    return {protocol: dict(by_fraction) for protocol, by_fraction in table.items()}


def paired_differences(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """ssl minus each baseline, seed by seed on the same label subset, per protocol and fraction."""
    by_key = {(r["init"], r["protocol"], r["label_fraction"], r["seed"]): r[metric] for r in results}
    comparisons = []
    for baseline in ("scratch", "generic"):
        for protocol, fraction in sorted({(r["protocol"], r["label_fraction"]) for r in results}):
            seeds = sorted(s for (i, p, f, s) in by_key if (i, p, f) == ("ssl", protocol, fraction)
                           and (baseline, protocol, fraction, s) in by_key)
            if not seeds:
                continue
            diffs = np.array([by_key[("ssl", protocol, fraction, s)] - by_key[(baseline, protocol, fraction, s)]
                              for s in seeds])
            comparisons.append({"baseline": baseline, "protocol": protocol, "label_fraction": fraction,
                                "metric": metric, "mean_difference": round(float(diffs.mean()), 4),
                                "std_difference": round(float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, 4),
                                "ssl_wins": int((diffs > 0).sum()), "n_seeds": len(seeds),
                                "verdict": verdict(diffs)})
    return comparisons


def verdict(diffs: np.ndarray) -> str:
    """`better` or `worse` only when every paired seed agrees; otherwise no clear difference."""
    if len(diffs) and (diffs > 0).all():
        return "better"
    if len(diffs) and (diffs < 0).all():
        return "worse"
    return "no clear difference"


def write_plot_data(out: Path, summary: list[dict[str, Any]], pretrain_log: dict[str, Any], metric: str) -> None:
    """CSV files that `dvc plots show` renders: one column per init/protocol series."""
    series = sorted({(r["init"], r["protocol"]) for r in summary})
    fractions = sorted({r["label_fraction"] for r in summary})
    means = {(r["init"], r["protocol"], r["label_fraction"]): r["mean"] for r in summary if r["metric"] == metric}
    with open(out / "label_efficiency.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label_fraction", *[f"{i}_{p}" for i, p in series]])
        for fraction in fractions:
            writer.writerow([fraction, *[means.get((i, p, fraction), "") for i, p in series]])
    with open(out / "pretrain_curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "rankme"])
        for point in pretrain_log["checkpoints"]:
            writer.writerow([point["step"], round(point["loss"], 5), round(point["rankme"], 3)])


def evaluate(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    domain_name = cfg.name
    finetuned = read_json(paths.finetune / "results.json")
    shards_summary = read_json(paths.shards / "summary.json")
    pretrain_log = read_json(paths.pretrain / "log.json")
    recorder = LineageRecorder(f"evaluate@{domain_name}", paths.evaluation, root=paths.root,
                               params={"finetune": asdict(cfg.finetune)},
                               upstream=[paths.finetune, paths.pretrain, paths.shards])
    summary = aggregate(finetuned["results"])
    metric = primary_metric(finetuned["classes"], finetuned["results"])
    metrics = {"domain": domain_name, "primary_metric": metric, "results": summary,
               "summary": flat_summary(summary, metric),
               "labeled_test": shards_summary["labeled_test"],
               "labeled_test_in_pretraining_corpus": shards_summary["labeled_test_exact_copies_in_pretraining"]}
    with atomic_dir(paths.evaluation) as out:
        write_json(out / "comparisons.json", paired_differences(finetuned["results"], metric))
        write_json(out / "results_per_seed.json", finetuned["results"])
        write_json(out / "metrics.json", metrics)
        recorder.write(out)
    # DVC reads metrics and plots at fixed paths per domain; the metrics copy inside
    # evaluation/ is the one the lineage record hashes.
    write_json(paths.metrics, metrics)
    paths.plots.mkdir(parents=True, exist_ok=True)
    write_plot_data(paths.plots, summary, pretrain_log, metric)
    log.info("evaluate %s: %d aggregated results", domain_name, len(summary))
    return metrics
