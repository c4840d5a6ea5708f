"""The verdict of a finished project as Markdown tables, one per domain: per label fraction each
init's best protocol (mean ± std over seeds), ssl minus each other init with its paired bootstrap
interval, and how the label-free checkpoint choice tracked a probe. Reads what evaluate wrote
(`reports/<domain>/metrics.json`, `evaluation/comparisons.json`, `evaluation/checkpoint_choice.json`).

    .venv/bin/python benchmarks/verdict_tables.py [--root .] [--domain legal ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INITS = ("ssl", "scratch", "generic", "baseline")


def read(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def table(root: Path, domain: str) -> str:
    reports = root / "reports" / domain
    metrics = read(reports / "metrics.json")
    if metrics is None:
        return f"{domain}: no reports/{domain}/metrics.json (run the pipeline first)"
    comparisons = read(reports / "evaluation" / "comparisons.json") or []
    best = {(r["init"], r["label_fraction"]): r for r in metrics.get("best_protocols", [])}
    inits = [i for i in INITS if any(key[0] == i for key in best)]
    paired = {(c["against"], c["label_fraction"]): c for c in comparisons if c.get("protocol") == "best"}
    compared = metrics.get("comparison_metric", metrics["primary_metric"])
    lines = [f"**{domain}**: {metrics['primary_metric']} on {metrics['labeled_test']} test rows; each init's "
             f"best protocol, mean ± std over seeds; ssl − other: mean paired difference in {compared} "
             "[bootstrap interval]", "",
             "| labels | n (groups) | " + " | ".join(inits) + " | " +
             " | ".join(f"ssl − {i}" for i in inits if i != "ssl") + " |",
             "|---" * (2 + 2 * len(inits) - 1) + "|"]
    for fraction in sorted({key[1] for key in best}):
        ssl = best.get(("ssl", fraction), {})
        cells = [f"{best[(i, fraction)]['mean']:.3f} ± {best[(i, fraction)]['std']:.3f} "
                 f"({best[(i, fraction)]['protocol']})" if (i, fraction) in best else "–" for i in inits]
        for other in inits[1:]:
            c = paired.get((other, fraction))
            if c is None:
                cells.append("–")
            elif c.get("interval"):
                cells.append(f"{c['mean_difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]")
            else:
                cells.append(f"{c['mean_difference']:+.3f}")
        lines.append(f"| {fraction:.0%} | {ssl.get('n_train', '')} ({ssl.get('n_groups', '')}) | "
                     + " | ".join(cells) + " |")
    choice = read(reports / "evaluation" / "checkpoint_choice.json")
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
    args = parser.parse_args()
    domains = args.domain or sorted(p.name for p in (args.root / "reports").iterdir() if p.is_dir())
    print("\n\n".join(table(args.root, domain) for domain in domains))


if __name__ == "__main__":
    main()
