"""report: Markdown and HTML with the verdict per label fraction, figures and lineage."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import markdown

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain
from tasks.figures import plot_label_efficiency, plot_pretraining
from tasks.io import atomic_dir, read_json, read_jsonl
from tasks.lineage import LineageRecorder, show
from tasks.paths import DomainPaths

log = logging.getLogger("report")


def verdict_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per label fraction and baseline, over the protocols."""
    lines = []
    for baseline in ("scratch", "generic"):
        rows = [c for c in comparisons if c["baseline"] == baseline]
        for fraction in sorted({c["label_fraction"] for c in rows}):
            parts = []
            for c in sorted((c for c in rows if c["label_fraction"] == fraction), key=lambda c: c["protocol"]):
                word = {"better": "beat", "worse": "lost to", "no clear difference": "did not clearly differ from"}[c["verdict"]]
                parts.append(f"{c['protocol']}: {word} {baseline} by {c['mean_difference']:+.3f} ± "
                             f"{c['std_difference']:.3f} {c['metric']} (better on {c['ssl_wins']}/{c['n_seeds']} seeds)")
            lines.append(f"- **{fraction:.0%} of labels** — domain pretraining " + "; ".join(parts) + ".")
    return lines


def results_table(metrics: dict[str, Any]) -> list[str]:
    rows = [r for r in metrics["results"] if r["metric"] == metrics["primary_metric"]]
    lines = ["| protocol | labels | n train | " + " | ".join(sorted({r["init"] for r in rows})) + " |",
             "|---|---|---|" + "---|" * len({r["init"] for r in rows})]
    inits = sorted({r["init"] for r in rows})
    for protocol in sorted({r["protocol"] for r in rows}):
        for fraction in sorted({r["label_fraction"] for r in rows}):
            cells = {r["init"]: r for r in rows if (r["protocol"], r["label_fraction"]) == (protocol, fraction)}
            n_train = next(iter(cells.values()))["n_train"] if cells else ""
            lines.append(f"| {protocol} | {fraction:.0%} | {n_train} | " + " | ".join(
                f"{cells[i]['mean']:.3f} ± {cells[i]['std']:.3f}" if i in cells else "–" for i in inits) + " |")
    return lines


def quarantine_lines(quarantine: list[dict[str, str]]) -> list[str]:
    """Counts per reason (no file names: they may identify a person)."""
    if not quarantine:
        return ["No file was quarantined."]
    reasons = Counter(q["reason"] for q in quarantine)
    return [f"{len(quarantine)} quarantined (full list, by key, in the manifest's `quarantine.jsonl`; "
            "keys are salted pseudonyms when the domain pseudonymises):", ""] + [
        f"- {count} × {reason}" for reason, count in reasons.most_common(10)]


def build_markdown(domain_name: str, task: str, metrics: dict[str, Any], comparisons: list[dict[str, Any]],
                   ingest_summary: dict[str, Any], shards_summary: dict[str, Any],
                   pretrain_log: dict[str, Any], lineage_text: str, quarantine: list[dict[str, str]]) -> str:
    last = pretrain_log["checkpoints"][-1]
    first = pretrain_log["checkpoints"][0]
    n_seeds = max(r["n_seeds"] for r in metrics["results"])
    by_split = ", ".join(f"{count} {split}" for split, count in ingest_summary["labeled_by_split"].items())
    has_generic = any(r["init"] == "generic" for r in metrics["results"])
    return "\n".join([
        f"# Domain pretraining report: {domain_name}",
        "",
        f"**Task.** {task}",
        "",
        f"**Data.** {ingest_summary['records']} records ingested from {ingest_summary['files']} files; "
        f"{ingest_summary['quarantined']} quarantined, {ingest_summary['duplicates_dropped']} exact duplicates dropped. "
        f"{ingest_summary['labeled']} labeled ({by_split}). Test set: "
        f"{metrics['labeled_test']} labeled samples, of which {metrics['labeled_test_in_pretraining_corpus']} "
        f"appear verbatim in the pretraining corpus"
        + (f" and {shards_summary['labeled_test_near_copies_in_pretraining']} as near-copies (same words, other "
           f"spacing or case)" if "labeled_test_near_copies_in_pretraining" in shards_summary else "") + ".",
        "",
        *quarantine_lines(quarantine),
        "",
        "## Verdict",
        "",
        "Initialisations: `ssl` is the domain-pretrained encoder, `scratch` the same architecture with "
        "random weights" + (", `generic` the base checkpoint without domain pretraining." if has_generic else
                             "; no generic checkpoint is configured (set the domain's base checkpoint in its `model` section to compare with one)."),
        "",
        f"Domain-pretrained encoder (`ssl`) against the baselines, primary metric `{metrics['primary_metric']}`, "
        f"paired over {n_seeds} seeds on the same label subsets; a verdict is `beat` or `lost to` only "
        "when every seed agrees.",
        "",
        *verdict_lines(comparisons),
        "",
        "## Results",
        "",
        f"`{metrics['primary_metric']}`, mean ± std over seeds.",
        "",
        *results_table(metrics),
        "",
        "![label efficiency](label_efficiency.png)",
        "",
        "## Pretraining",
        "",
        f"{last['step']} steps; loss {first['loss']:.3f} at step {first['step']} → {last['loss']:.3f}; "
        f"RankMe {first['rankme']:.1f} → {last['rankme']:.1f}.",
        "",
        "![pretraining](pretraining.png)",
        "",
        "## Lineage",
        "",
        "```",
        lineage_text,
        "```",
        "",
        f"Verify by re-hashing: `ssl-pipeline lineage verify reports/{domain_name}/report`.",
        "",
    ])


def report(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> str:
    domain_name = cfg.name
    metrics = read_json(paths.evaluation / "metrics.json")
    comparisons = read_json(paths.evaluation / "comparisons.json")
    pretrain_log = read_json(paths.pretrain / "log.json")
    recorder = LineageRecorder(f"report@{domain_name}", paths.report, params={}, root=paths.root,
                               upstream=[paths.evaluation])
    uses_default = cfg.resolve(cfg.corpus).resolve().is_relative_to(paths.default_data.resolve())
    with atomic_dir(paths.report) as out:
        plot_label_efficiency(metrics["results"], metrics["primary_metric"], out / "label_efficiency.png")
        plot_pretraining(pretrain_log, out / "pretraining.png")
        text = build_markdown(domain_name, domain.task_description(cfg, uses_default), metrics, comparisons,
                              read_json(paths.manifest / "summary.json"), read_json(paths.shards / "summary.json"),
                              pretrain_log, show(paths.evaluation, paths.root, runs=False),
                              read_jsonl(paths.manifest / "quarantine.jsonl"))
        (out / "report.md").write_text(text)
        html = markdown.markdown(text, extensions=["tables", "fenced_code"])
        (out / "report.html").write_text(
            f"<!doctype html><meta charset='utf-8'><title>{domain_name} report</title>"
            f"<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:2px 6px}}</style>{html}")
        recorder.write(out)
    log.info("report %s written to %s", domain_name, paths.report / "report.md")
    return text
