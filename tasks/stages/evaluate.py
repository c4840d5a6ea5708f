"""evaluate: results over seeds -> metrics.json (the schema every domain shares), paired
comparisons of `ssl` against `scratch`, `baseline` and `generic` with bootstrap intervals, and
data for DVC plots and the report.

The interval of a paired difference resamples the test rows and the seeds jointly: each
bootstrap replicate draws test rows with replacement (the same rows for both inits and every
seed) and seeds with replacement (the same seeds for both inits: they share the label subset),
and recomputes the metric from each row's test predictions. Two sources of spread are thus in
the interval: which test texts/images we happened to have, and which label subset we drew.
Test rows are treated as independent; rows of one group (a speaker, a patient) are not.
"""

from __future__ import annotations

import csv
import io
import logging
import zlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from tasks.io import atomic_dir, read_json, write_json, write_text
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths

log = logging.getLogger("evaluate")
METRICS = ("auroc", "macro_f1", "accuracy")
COMPARED = ("scratch", "baseline", "generic")  # what the domain-pretrained `ssl` is judged against
Results = list[dict[str, Any]]


def primary_metric(classes: list[str], results: Results) -> str:
    """AUROC for two classes (threshold-free, fair to imbalanced sets), macro-F1 otherwise."""
    if len(classes) == 2 and results and all("auroc" in r for r in results):
        return "auroc"
    return "macro_f1"


def comparison_metric(primary: str, with_predictions: bool) -> str:
    """The metric the paired intervals are in: the primary one, except AUROC, which needs class
    probabilities per test row (results.json keeps only the predicted class): macro-F1 then."""
    return "macro_f1" if primary == "auroc" and with_predictions else primary


def has_predictions(finetuned: dict[str, Any]) -> bool:
    """Whether results.json carries per-row test predictions (the bootstrap needs them)."""
    return "test_labels" in finetuned and bool(finetuned["results"]) and all(
        "predicted" in r for r in finetuned["results"])


def aggregate(results: Results) -> Results:
    """mean and std over seeds per (init, protocol, label fraction, metric), with the mean number
    of labels (`n_train`) and of groups (`n_groups`, when recorded) in the label subsets."""
    groups: dict[tuple, Results] = defaultdict(list)
    for row in results:
        groups[(row["init"], row["protocol"], row["label_fraction"])].append(row)
    summary = []
    for (init, protocol, fraction), rows in sorted(groups.items()):
        sizes = {"n_seeds": len(rows), "n_test": rows[0]["n_test"],
                 "n_train": round(float(np.mean([r["n_train"] for r in rows])))}
        if all("n_groups" in r for r in rows):
            sizes["n_groups"] = round(float(np.mean([r["n_groups"] for r in rows])))
        for metric in (m for m in METRICS if all(m in r for r in rows)):
            values = np.array([r[metric] for r in rows])
            summary.append({"init": init, "protocol": protocol, "label_fraction": fraction, "metric": metric,
                            "mean": round(float(values.mean()), 4),
                            "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4), **sizes})
    return summary


def finetune_budget(results: Results, batch_size: int) -> Results:
    """Fine-tuning's length per label fraction, the same rule for every init: the steps it ran
    (`finetune.epochs` passes over the subset, capped at `max_steps`) and the passes over the
    labeled subset they made (mean over seeds). Rows of an older finetune stage record no steps."""
    runs: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for row in results:
        steps = (row.get("chosen") or {}).get("steps")
        if row["protocol"] == "finetune" and steps:
            runs[row["label_fraction"]].append((steps, row["n_train"]))
    return [{"label_fraction": fraction, "steps": round(float(np.mean([s for s, _ in rows]))),
             "batch_size": batch_size,
             "passes": round(float(np.mean([s * batch_size / max(1, n) for s, n in rows])), 2)}
            for fraction, rows in sorted(runs.items())]


def flat_summary(summary: Results, metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """Primary-metric means as protocol -> pct<labels> -> init, the nesting `dvc metrics show`
    and `dvc exp show` flatten into columns such as `summary.linear.pct10.ssl`."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in summary:
        if row["metric"] == metric:
            table[row["protocol"]][fraction_key(row["label_fraction"])][row["init"]] = row["mean"]
    return {protocol: dict(by_fraction) for protocol, by_fraction in table.items()}


def fraction_key(fraction: float) -> str:
    return f"pct{100 * fraction:g}"


def best_protocols(summary: Results, metric: str) -> Results:
    """Each init's summary row with the highest mean per label fraction (ties: protocol name).
    Chosen on the test means: descriptive, see `paired_differences` for what the interval adds."""
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for row in sorted((r for r in summary if r["metric"] == metric), key=lambda r: r["protocol"]):
        key = (row["init"], row["label_fraction"])
        if key not in best or row["mean"] > best[key]["mean"]:
            best[key] = row
    return [best[key] for key in sorted(best, key=lambda key: (key[1], key[0]))]


def best_summary(best: Results) -> dict[str, dict[str, float]]:
    """The best protocols' means as pct<labels> -> init (numbers only, for `dvc metrics show`)."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for row in best:
        table[fraction_key(row["label_fraction"])][row["init"]] = row["mean"]
    return dict(table)


# --- the paired bootstrap ------------------------------------------------------------------

def derived_seed(seed: int, purpose: str) -> list[int]:
    """A seed for one purpose, derived from the params' seed (never from the clock)."""
    return [seed, zlib.crc32(purpose.encode())]


def resampled_test_rows(n_test: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n_test] test-row indices drawn with replacement, shared by every comparison."""
    return np.random.default_rng(derived_seed(seed, f"test-rows/{n_test}")).integers(0, n_test, (samples, n_test))


def resampled_seeds(n_seeds: int, samples: int, seed: int, fraction: float) -> np.ndarray:
    """[samples, n_seeds] positions into a fraction's sorted seed list, drawn with replacement."""
    rng = np.random.default_rng(derived_seed(seed, f"seeds/{fraction:g}/{n_seeds}"))
    return rng.integers(0, n_seeds, (samples, n_seeds))


def scores_of_predictions(labels: np.ndarray, predicted: np.ndarray, rows: np.ndarray, n_classes: int,
                          metric: str) -> np.ndarray:
    """`metric` of `predicted` against `labels` on each resample `rows[b]` -> [samples].

    macro-F1 as scikit-learn's `f1_score(average="macro", zero_division=0)`: the mean over the
    classes that occur in the resample's labels or predictions, from one confusion matrix per
    resample (a bincount, so 1,000 resamples of a few thousand rows take milliseconds)."""
    out = np.empty(len(rows))
    chunk = max(1, 2_000_000 // max(1, rows.shape[1]))  # bounds memory for large test sets
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk]
        truth, guess = labels[block], predicted[block]
        if metric == "accuracy":
            out[start:start + len(block)] = (truth == guess).mean(axis=1)
            continue
        cells = (np.arange(len(block))[:, None] * n_classes + truth) * n_classes + guess
        confusion = np.bincount(cells.ravel(), minlength=len(block) * n_classes ** 2).reshape(
            len(block), n_classes, n_classes)
        true_positive = np.diagonal(confusion, axis1=1, axis2=2)
        denominator = confusion.sum(axis=2) + confusion.sum(axis=1)
        present = denominator > 0
        f1 = np.divide(2 * true_positive, denominator, out=np.zeros(denominator.shape), where=present)
        out[start:start + len(block)] = f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return out


class Bootstrap:
    """Resampled scores of every (init, protocol, fraction, seed) row, computed once each."""

    def __init__(self, finetuned: dict[str, Any], metric: str, samples: int, confidence: float, seed: int) -> None:
        self.labels = np.asarray(finetuned["test_labels"], dtype=np.int64)
        self.n_classes = max(len(finetuned["classes"]), int(self.labels.max(initial=-1)) + 1)
        self.rows = {(r["init"], r["protocol"], r["label_fraction"], r["seed"]): r for r in finetuned["results"]}
        self.metric, self.samples, self.confidence, self.seed = metric, samples, confidence, seed
        self.test_rows = resampled_test_rows(len(self.labels), samples, seed)
        self._scores: dict[tuple, np.ndarray] = {}

    def scores(self, key: tuple) -> np.ndarray:
        if key not in self._scores:
            predicted = np.asarray(self.rows[key]["predicted"], dtype=np.int64)
            if predicted.shape != self.labels.shape:
                raise PipelineError(f"results.json: {len(predicted)} predictions in the {key[0]}/{key[1]} row at "
                                    f"fraction {key[2]}, seed {key[3]}, for {len(self.labels)} test labels: "
                                    "re-run the finetune stage")
            self._scores[key] = scores_of_predictions(self.labels, predicted, self.test_rows,
                                                      self.n_classes, self.metric)
        return self._scores[key]

    def seed_means(self, init: str, protocol: str, fraction: float, seeds: list[int]) -> np.ndarray:
        """[samples] mean over the resampled seeds of the resampled-test scores."""
        draws = resampled_seeds(len(seeds), self.samples, self.seed, fraction)
        per_seed = np.stack([self.scores((init, protocol, fraction, s)) for s in seeds])  # [seeds, samples]
        return np.take_along_axis(per_seed, draws.T, axis=0).mean(axis=0)

    def interval(self, differences: np.ndarray) -> tuple[float, float]:
        tail = 100 * (1 - self.confidence) / 2
        low, high = np.percentile(differences, [tail, 100 - tail])
        return round(float(low), 4), round(float(high), 4)


def paired_differences(results: Results, metric: str, bootstrap: Bootstrap | None = None) -> Results:
    """ssl minus each of `COMPARED`, seed by seed on the same label subsets, per label fraction:
    per protocol both ran, and best protocol against best protocol (`protocol: "best"`).

    The best protocols are those with the highest test mean over the shared seeds: results.json
    holds no score that would choose them without the test set. So the interval of a `best`
    comparison re-chooses each init's protocol inside every replicate: it carries the noise of
    that choice; the point estimate remains an optimistic, descriptive figure for both inits."""
    values = {(r["init"], r["protocol"], r["label_fraction"], r["seed"]): r[metric] for r in results}
    protocols_of: dict[tuple[str, float], set[str]] = defaultdict(set)
    seeds_of: dict[tuple[str, str, float], set[int]] = defaultdict(set)
    for init, protocol, fraction, seed in values:
        protocols_of[(init, fraction)].add(protocol)
        seeds_of[(init, protocol, fraction)].add(seed)
    comparisons = []
    for fraction in sorted({f for _, f in protocols_of}):
        for against in COMPARED:
            ssl_protocols, other_protocols = protocols_of[("ssl", fraction)], protocols_of[(against, fraction)]
            for protocol in sorted(ssl_protocols & other_protocols):
                seeds = sorted(seeds_of[("ssl", protocol, fraction)] & seeds_of[(against, protocol, fraction)])
                comparisons.append(compare(values, bootstrap, metric, fraction, against, seeds,
                                           [protocol], [protocol], scope=protocol))
            if ssl_protocols and other_protocols:
                every_run = [seeds_of[("ssl", p, fraction)] for p in ssl_protocols] + [
                    seeds_of[(against, p, fraction)] for p in other_protocols]
                seeds = sorted(set.intersection(*every_run))  # seeds on which every protocol of both ran
                comparisons.append(compare(values, bootstrap, metric, fraction, against, seeds,
                                           sorted(ssl_protocols), sorted(other_protocols), scope="best"))
    return [c for c in comparisons if c is not None]


def compare(values: dict[tuple, float], bootstrap: Bootstrap | None, metric: str, fraction: float, against: str,
            seeds: list[int], ssl_protocols: list[str], other_protocols: list[str],
            scope: str) -> dict[str, Any] | None:
    """One paired comparison: ssl's best of `ssl_protocols` minus `against`'s best of
    `other_protocols` (one protocol each for a per-protocol comparison) over `seeds`."""
    if not seeds:
        return None

    def best(init: str, protocols: list[str]) -> str:  # ties: the first in name order
        return max(protocols, key=lambda p: np.mean([values[(init, p, fraction, s)] for s in seeds]))

    ssl_protocol, other_protocol = best("ssl", ssl_protocols), best(against, other_protocols)
    diffs = np.array([values[("ssl", ssl_protocol, fraction, s)] - values[(against, other_protocol, fraction, s)]
                      for s in seeds])
    row: dict[str, Any] = {
        "against": against, "protocol": scope, "ssl_protocol": ssl_protocol, "against_protocol": other_protocol,
        "label_fraction": fraction, "metric": metric, "mean_difference": round(float(diffs.mean()), 4),
        "std_difference": round(float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, 4),
        "ssl_wins": int((diffs > 0).sum()), "n_seeds": len(seeds)}
    if bootstrap is None:
        return {**row, "interval": None, "verdict": verdict(diffs)}
    replicate = {init: np.max([bootstrap.seed_means(init, p, fraction, seeds) for p in protocols], axis=0)
                 for init, protocols in (("ssl", ssl_protocols), (against, other_protocols))}
    low, high = bootstrap.interval(replicate["ssl"] - replicate[against])
    return {**row, "interval": [low, high], "confidence": bootstrap.confidence,
            "bootstrap_samples": bootstrap.samples, "verdict": interval_verdict(low, high)}


def interval_verdict(low: float, high: float) -> str:
    """`better` or `worse` only when the whole interval is on one side of zero."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no clear difference"


def verdict(diffs: np.ndarray) -> str:
    """Without per-row predictions (no interval): `better` or `worse` only when every paired seed agrees."""
    if len(diffs) and (diffs > 0).all():
        return "better"
    if len(diffs) and (diffs < 0).all():
        return "worse"
    return "no clear difference"


def paired_summary(comparisons: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Best-against-best differences as pct<labels> -> ssl_vs_<init> -> difference, low, high:
    numbers only, so `dvc metrics show` lists them as columns."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for c in comparisons:
        if c["protocol"] == "best":
            entry = {"difference": c["mean_difference"]}
            if c["interval"] is not None:
                entry.update(low=c["interval"][0], high=c["interval"][1])
            table[fraction_key(c["label_fraction"])][f"ssl_vs_{c['against']}"] = entry
    return dict(table)


# --- outputs -------------------------------------------------------------------------------

def csv_text(header: list[Any], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_plot_data(out: Path, summary: Results, pretrain_log: dict[str, Any], metric: str) -> None:
    """CSV files that `dvc plots show` renders: one column per init/protocol series."""
    series = sorted({(r["init"], r["protocol"]) for r in summary})
    fractions = sorted({r["label_fraction"] for r in summary})
    means = {(r["init"], r["protocol"], r["label_fraction"]): r["mean"] for r in summary if r["metric"] == metric}
    write_text(out / "label_efficiency.csv", csv_text(
        ["label_fraction", *[f"{i}_{p}" for i, p in series]],
        [[fraction, *[means.get((i, p, fraction), "") for i, p in series]] for fraction in fractions]))
    write_text(out / "pretrain_curve.csv", csv_text(
        ["step", "loss", "rankme"],
        [[p["step"], round(p["loss"], 5), round(p["rankme"], 3)] for p in pretrain_log["checkpoints"]]))


def evaluate(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    domain_name, settings = cfg.name, cfg.finetune
    finetuned = read_json(paths.finetune / "results.json")
    shards_summary = read_json(paths.shards / "summary.json")
    pretrain_log = read_json(paths.pretrain / "log.json")
    recorder = LineageRecorder(f"evaluate@{domain_name}", paths.evaluation, root=paths.root,
                               params={"finetune": asdict(settings)},
                               upstream=[paths.finetune, paths.pretrain, paths.shards])
    summary = aggregate(finetuned["results"])
    metric = primary_metric(finetuned["classes"], finetuned["results"])
    with_predictions = has_predictions(finetuned)
    compared_in = comparison_metric(metric, with_predictions)
    bootstrap = (Bootstrap(finetuned, compared_in, settings.bootstrap_samples, settings.confidence,
                           settings.seeds[0]) if with_predictions else None)
    if bootstrap is None:
        log.info("evaluate %s: results.json has no per-row test predictions; paired differences come "
                 "without intervals (re-run finetune for them)", domain_name)
    comparisons = paired_differences(finetuned["results"], compared_in, bootstrap)
    best = best_protocols(summary, metric)
    metrics = {"domain": domain_name, "primary_metric": metric, "comparison_metric": compared_in,
               **({"confidence": settings.confidence} if with_predictions else {}),
               "results": summary, "summary": flat_summary(summary, metric), "best_protocols": best,
               "best": best_summary(best), "paired": paired_summary(comparisons),
               "finetune_budget": finetune_budget(finetuned["results"], settings.batch_size),
               "labeled_test": shards_summary["labeled_test"],
               "labeled_test_in_pretraining_corpus": shards_summary["labeled_test_exact_copies_in_pretraining"]}
    with atomic_dir(paths.evaluation) as out:
        write_json(out / "comparisons.json", comparisons)
        write_json(out / "results_per_seed.json", [{k: v for k, v in r.items() if k != "predicted"}
                                                   for r in finetuned["results"]])
        write_json(out / "metrics.json", metrics)
        # the report reads only this stage's folder (its declared input): pass the finetune
        # stage's figures data on, with the class names the embedding plot's legend needs
        if (paths.finetune / "embedding_2d.json").exists():
            write_json(out / "embedding_2d.json", {**read_json(paths.finetune / "embedding_2d.json"),
                                                   "classes": finetuned["classes"]})
        choice_file = paths.finetune / "checkpoint_choice.json"
        if choice_file.exists():
            write_json(out / "checkpoint_choice.json", read_json(choice_file))
        recorder.write(out)
    # DVC reads metrics and plots at fixed paths per domain; the metrics copy inside
    # evaluation/ is the one the lineage record hashes.
    write_json(paths.metrics, metrics)
    paths.plots.mkdir(parents=True, exist_ok=True)
    write_plot_data(paths.plots, summary, pretrain_log, metric)
    log.info("evaluate %s: %d aggregated results, %d paired comparisons", domain_name, len(summary), len(comparisons))
    return metrics
