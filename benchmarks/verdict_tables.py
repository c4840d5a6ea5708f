"""The verdict of a finished project as Markdown tables, one per domain: per label fraction each
init's best protocol (mean ± std over seeds), ssl minus each other init with its paired bootstrap
interval, and how the label-free checkpoint choice tracked a probe. Reads what evaluate wrote
(`reports/<domain>/metrics.json`, `evaluation/comparisons.json`, `evaluation/checkpoint_choice.json`).

    .venv/bin/python benchmarks/verdict_tables.py [--root .] [--domain legal ...] [--plain-recipe]

`--plain-recipe` adds a reference column: what a practitioner gets with the plain, well-known
recipe on the same rows, scikit-learn's `LogisticRegression(C=1, class_weight="balanced")` on the
domain's own baseline features (fitted on the same labeled pool), over the same label subsets
and seeds as the pipeline (macro-F1, mean ± std over seeds). Needs the project's shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_models.core.config import INITS
from tasks.stages.report import ENVIRONMENT, best_of, optional_json, percent

VERDICT = ENVIRONMENT.get_template("verdict.md.j2").module  # the report's table rows, scores and differences


def plain_recipe(root: Path, domain_name: str) -> dict[float, str]:
    """Per label fraction: macro-F1 (mean ± std over the pipeline's seeds) of plain balanced
    logistic regression on the domain's baseline features, on the pipeline's own subsets."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from ssl_models.core.config import load_config
    from ssl_models.core.splits import select_label_subset
    from tasks.paths import DomainPaths
    from tasks.stages.finetune import load_labeled

    cfg, domain = load_config(domain_name, root / "params.yaml")
    pool, test = load_labeled(DomainPaths(domain_name, root).shards)
    pool_x, test_x = domain.baseline_features(cfg, pool, test)
    labels, test_y = [r["label"] for r in pool], [r["label"] for r in test]
    found = {}
    for fraction in cfg.finetune.label_fractions:
        scores = []
        for seed in cfg.finetune.seeds_for(fraction):
            subset = select_label_subset(labels, fraction, seed)
            plain = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
            plain.fit(pool_x[subset], [labels[i] for i in subset])
            scores.append(f1_score(test_y, plain.predict(test_x), average="macro", zero_division=0))
        found[fraction] = f"{np.mean(scores):.3f} ± {np.std(scores):.3f}"
    return found


def table(root: Path, domain: str, reference: bool = False) -> str:
    reports = root / "reports" / domain
    metrics = optional_json(reports / "metrics.json")
    if metrics is None:
        return f"{domain}: no reports/{domain}/metrics.json (run the pipeline first)"
    comparisons = optional_json(reports / "evaluation" / "comparisons.json") or []
    best = best_of(metrics)
    inits = [i for i in INITS if any(key[0] == i for key in best)]
    others = [i for i in inits if i != "ssl"]  # the differences' columns
    paired = {(c["against"], c["label_fraction"]): c for c in comparisons if c.get("protocol") == "best"}
    compared = metrics.get("comparison_metric", metrics["primary_metric"])
    fractions = sorted({key[1] for key in best})
    plain = plain_recipe(root, domain) if reference else {}
    rows = []
    for fraction in fractions:
        ssl = best.get(("ssl", fraction), {})
        rows.append([percent(fraction), f"{ssl.get('n_train', '')} ({ssl.get('n_groups', '')})"]
                    + [VERDICT.best(best[(i, fraction)]) if (i, fraction) in best else "–" for i in inits]
                    + [VERDICT.difference(paired[(i, fraction)], seeds=False) if (i, fraction) in paired else "–"
                       for i in others]
                    + ([plain.get(fraction, "–")] if reference else []))
    header = ["labels", "n (groups)", *inits, *(f"ssl − {i}" for i in others)]
    if reference:
        header.append("plain balanced LR (C=1) on the baseline's features")
    lines = [f"**{domain}**: {metrics['primary_metric']} on {metrics['labeled_test']} test rows; each init's "
             f"best protocol, mean ± std over seeds; ssl − other: mean paired difference in {compared} "
             "[bootstrap interval]", "", VERDICT.table(header, rows)]
    choice = optional_json(reports / "evaluation" / "checkpoint_choice.json")
    if choice:
        lines += ["", f"Checkpoint choice: rule `{choice.get('rule')}`, step {choice.get('chosen_step')} (last "
                      f"{choice.get('last_step')}); Spearman(RankMe, val-split probe macro-F1) over "
                      f"{len(choice.get('candidates', []))} candidates: {fmt(choice.get('spearman'))}; "
                      f"gain of the choice vs the last: {fmt(choice.get('gain_vs_last'))}."]
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--domain", action="append", help="repeatable; default: every domain with reports")
    parser.add_argument("--plain-recipe", action="store_true",
                        help="add the plain balanced logistic regression on the baseline features as a column")
    args = parser.parse_args()
    domains = args.domain or sorted(p.name for p in (args.root / "reports").iterdir() if p.is_dir())
    print("\n\n".join(table(args.root, domain, args.plain_recipe) for domain in domains))


if __name__ == "__main__":
    main()
