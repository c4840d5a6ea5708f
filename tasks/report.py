"""report: Markdown and HTML with the verdict per label fraction, figures and lineage.

The verdict answers the question the pipeline exists for: did pretraining on our own data pay
off? Per label fraction it names the best init and judges the domain-pretrained encoder
against each init a practitioner could use instead (scratch, the classical baseline, the
generic checkpoint) by the paired difference and its bootstrap interval; where pretraining
does not beat all of them, it says what to use instead.
"""

from __future__ import annotations

import html
import importlib
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import markdown

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain
from tasks.figures import (
    ordered_inits,
    plot_embeddings,
    plot_label_efficiency,
    plot_pretraining,
)
from tasks.io import atomic_dir, read_json, read_jsonl, write_text
from tasks.lineage import LineageRecorder, show
from tasks.paths import DomainPaths

log = logging.getLogger("report")

NAMES = {"ssl": "domain pretraining (`ssl`)", "scratch": "scratch", "baseline": "the baseline", "generic": "generic"}
# what a practitioner pays to get each init, least first: the advice picks the cheapest of equals
COST_ORDER = ("baseline", "generic", "scratch", "ssl")
WORDS = {"better": "beat", "worse": "lost to", "no clear difference": "no clear difference"}

# fits a 1280-px laptop screen: figures scale down, long lines (lineage, paths) wrap, wide
# tables scroll inside their own box instead of widening the page
CSS = """
*,*::before,*::after{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;line-height:1.45;max-width:62em;
margin:0 auto;padding:0 1.2em 2em;color:#1f2328}
p,li,h1,h2,h3{overflow-wrap:anywhere}
img{max-width:100%;height:auto;display:block}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;padding:.6em .8em;font-size:.85em}
code{overflow-wrap:anywhere}
.table-scroll{max-width:100%;overflow-x:auto;margin:.6em 0}
table{border-collapse:collapse;font-size:.92em}
td,th{border:1px solid #d0d7de;padding:2px 7px;text-align:left;vertical-align:top}
th{background:#f6f8fa}
"""


def unbroken(text: str) -> str:
    """A table cell's figure kept on one line (no-break spaces): the cell wraps only between figures."""
    return text.replace(" ", "\u00a0")


def best_of(metrics: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    """Each init's best protocol per fraction, as the evaluate stage chose it: (init, fraction) -> row."""
    return {(row["init"], row["label_fraction"]): row for row in metrics.get("best_protocols", [])}


def alternatives(comparisons: list[dict[str, Any]]) -> list[str]:
    """The inits ssl is compared with, in the evaluate stage's order (scratch, baseline, generic)."""
    return list(dict.fromkeys(c["against"] for c in comparisons))


def pct(fraction: float) -> str:
    return f"{fraction:.0%}"


def name_of(init: str) -> str:
    return NAMES.get(init, f"`{init}`")


def interval_text(comparison: dict[str, Any]) -> str:
    """`+0.054 [+0.021, +0.088]`, or the difference with its seed wins when there is no interval."""
    if comparison.get("interval") is None:
        return (f"{comparison['mean_difference']:+.3f} (no interval; ssl better on "
                f"{comparison['ssl_wins']}/{comparison['n_seeds']} seeds)")
    low, high = comparison["interval"]
    return f"{comparison['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def subset_sizes(metrics: dict[str, Any], fraction: float) -> str:
    """`184 labels from 37 groups, 5 seeds`: the label subset behind a fraction (the same for every init)."""
    rows = [r for r in metrics["results"]
            if r["label_fraction"] == fraction and r["metric"] == metrics["primary_metric"]]
    row = next((r for r in rows if r["init"] == "ssl"), rows[0])
    groups = f" from {row['n_groups']} groups" if "n_groups" in row else ""
    return f"{row['n_train']} labels{groups}, {row['n_seeds']} seeds"


def recommendation(fraction: float, best: dict[str, dict[str, Any]], judged: dict[str, dict[str, Any]],
                   paid_off: bool) -> str:
    """What a practitioner should use at this fraction, in one sentence."""
    if paid_off:
        return f"Use the domain-pretrained encoder ({best['ssl']['protocol']}) at {pct(fraction)} labels."
    top = max(best, key=lambda init: best[init]["mean"])
    if top != "ssl":
        within = " (its lead over `ssl` is within the interval)" if judged.get(top, {}).get(
            "verdict") == "no clear difference" else ""
        return f"Use {name_of(top)} ({best[top]['protocol']}) at {pct(fraction)} labels{within}."
    level = [init for init, c in judged.items() if c["verdict"] != "better"]
    if not level:
        missing = [name_of(i) for i in ("baseline", "generic") if i not in judged]
        return (f"Domain pretraining beat every init that ran; run {' and '.join(missing)} before relying "
                f"on it at {pct(fraction)} labels.")
    cheapest = min(level, key=COST_ORDER.index)
    return (f"`ssl` has the highest mean but is not clearly above {', '.join(name_of(i) for i in level)}: "
            f"use {name_of(cheapest)} ({best[cheapest]['protocol']}) at {pct(fraction)} labels, "
            "which needs no domain pretraining.")


def verdict_lines(metrics: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[str]:
    """One list item per label fraction: the best init, whether pretraining paid off, what to
    use, and below it ssl against each alternative (best protocol against best protocol, with
    the interval)."""
    best_rows = best_of(metrics)
    unit = metrics.get("comparison_metric", metrics["primary_metric"])
    lines = []
    for fraction in sorted({f for _, f in best_rows}):
        best = {init: row for (init, f), row in best_rows.items() if f == fraction}
        top = max(ordered_inits(best), key=lambda init: best[init]["mean"])
        judged = {c["against"]: c for c in comparisons
                  if c["protocol"] == "best" and c["label_fraction"] == fraction}
        judged = {init: judged[init] for init in alternatives(comparisons) if init in judged}
        head = (f"- **{pct(fraction)} of labels** ({subset_sizes(metrics, fraction)}): best is "
                f"`{top}` ({best[top]['protocol']}), {best[top]['mean']:.3f} {metrics['primary_metric']}.")
        if "ssl" not in best or not judged:
            lines.append(f"{head} Nothing to compare the domain-pretrained encoder with at this fraction.")
            continue
        parts = [f"against {name_of(init)} ({c['ssl_protocol']} vs its {c['against_protocol']}): "
                 f"{interval_text(c)} {unit}, {WORDS[c['verdict']]}" for init, c in judged.items()]
        beats_all = all(c["verdict"] == "better" for c in judged.values())
        paid_off = beats_all and "baseline" in judged
        if paid_off:
            opening = "**Pretraining paid off**: domain pretraining beat every alternative"  # the only "paid off"
        elif beats_all:
            opening = "Domain pretraining beat every init that ran, but no baseline ran, so it is not shown to pay off"
        else:
            opening = "Domain pretraining did not pay off"
        # the advice first, then the evidence: one sub-item per alternative
        lines.append(f"{head} {opening}. **{recommendation(fraction, best, judged, paid_off)}**\n"
                     + "\n".join(f"    - {part}" for part in parts))
    return lines


def method_lines(metrics: dict[str, Any], comparisons: list[dict[str, Any]], baseline_text: str | None) -> list[str]:
    """How to read the verdict: the inits, the metric, the interval and the protocol choice."""
    inits = {r["init"] for r in metrics["results"]}
    described = ["`ssl` is the domain-pretrained encoder", "`scratch` the same architecture with random weights"]
    if "generic" in inits:
        described.append("`generic` the off-the-shelf checkpoint without domain pretraining")
    if "baseline" in inits:
        described.append(f"`baseline` {baseline_text or 'the classical features a practitioner tries first'}")
    missing = [i for i in ("generic", "baseline") if i not in inits]
    lines = ["Initialisations: " + "; ".join(described) + "."
             + (f" Not run: {', '.join(f'`{i}`' for i in missing)}." if missing else "")]
    primary, unit = metrics["primary_metric"], metrics.get("comparison_metric", metrics["primary_metric"])
    with_interval = any(c.get("interval") is not None for c in comparisons)
    if with_interval:
        confidence = metrics.get("confidence") or next(c["confidence"] for c in comparisons if c.get("interval"))
        samples = next(c["bootstrap_samples"] for c in comparisons if c.get("interval"))
        lines.append(
            f"Differences are `ssl` minus the other init in `{unit}`, paired on the same label subsets "
            f"and test rows, with a {confidence:.0%} paired bootstrap interval ({samples} replicates "
            "resampling the test rows and the seeds together; test rows are treated as independent). "
            "A difference counts as `beat` or `lost to` only when its whole interval is on one side of zero, "
            "and pretraining is said to pay off at a fraction only when it beats scratch, the baseline and "
            "the generic checkpoint (where one ran) there.")
    else:
        lines.append(
            f"Differences are `ssl` minus the other init in `{unit}`, paired over seeds on the same label "
            "subsets. results.json holds no per-row test predictions (it was written by an older finetune "
            "stage), so there are no intervals: re-run finetune for them. Without an interval a difference "
            "counts as `beat` or `lost to` only when every seed agrees.")
    if unit != primary:
        lines.append(f"The tables give `{primary}`; the paired differences are in `{unit}`, computed from "
                     f"each run's test predictions: `{primary}` needs per-row class probabilities, which "
                     "results.json does not keep.")
    lines.append(
        "Each init is judged by its best protocol: the one with the highest mean over seeds on the test "
        "set. No score measured without the test set exists for every protocol (the linear probe's "
        "cross-validation covers one of them), so this choice is descriptive and flatters every init "
        "alike; the interval re-makes the choice in every bootstrap replicate, so it carries that "
        "choice's noise. The per-protocol differences below are free of it.")
    return lines


def results_table(metrics: dict[str, Any]) -> list[str]:
    """Mean ± std per protocol and fraction, with the subset's labels and groups."""
    rows = [r for r in metrics["results"] if r["metric"] == metrics["primary_metric"]]
    inits = ordered_inits({r["init"] for r in rows})
    lines = ["| protocol | labels | n labels | n groups | " + " | ".join(inits) + " |",
             "|---|---|---|---|" + "---|" * len(inits)]
    for protocol in sorted({r["protocol"] for r in rows}):
        for fraction in sorted({r["label_fraction"] for r in rows}):
            cells = {r["init"]: r for r in rows if (r["protocol"], r["label_fraction"]) == (protocol, fraction)}
            if not cells:
                continue
            first = cells.get("ssl") or next(iter(cells.values()))
            lines.append(f"| {protocol} | {pct(fraction)} | {first['n_train']} | {first.get('n_groups', '–')} | "
                         + " | ".join(unbroken(f"{cells[i]['mean']:.3f} ± {cells[i]['std']:.3f}") if i in cells
                                      else "–" for i in inits) + " |")
    return lines


def best_table(metrics: dict[str, Any]) -> list[str]:
    """Each init's best protocol per fraction: the figures the verdict compares."""
    best = best_of(metrics)
    inits = ordered_inits({i for i, _ in best})
    lines = ["| labels | n labels | n groups | seeds | " + " | ".join(inits) + " |",
             "|---|---|---|---|" + "---|" * len(inits)]
    for fraction in sorted({f for _, f in best}):
        cells = {i: row for (i, f), row in best.items() if f == fraction}
        first = cells.get("ssl") or next(iter(cells.values()))
        lines.append(f"| {pct(fraction)} | {first['n_train']} | {first.get('n_groups', '–')} | {first['n_seeds']} | "
                     + " | ".join(unbroken(f"{cells[i]['mean']:.3f} ± {cells[i]['std']:.3f}")
                                  + f" ({cells[i]['protocol']})" if i in cells else "–" for i in inits) + " |")
    return lines


def comparisons_table(comparisons: list[dict[str, Any]]) -> list[str]:
    lines = ["| labels | ssl vs | protocols | difference [interval] | ssl better on | verdict |",
             "|---|---|---|---|---|---|"]
    order = alternatives(comparisons)
    for c in sorted(comparisons, key=lambda c: (c["label_fraction"], order.index(c["against"]),
                                                c["protocol"] != "best", c["protocol"])):
        protocols = (f"best: {c['ssl_protocol']} vs {c['against_protocol']}" if c["protocol"] == "best"
                     else c["protocol"])
        lines.append(f"| {pct(c['label_fraction'])} | {c['against']} | {protocols} | {unbroken(interval_text(c))} | "
                     f"{c['ssl_wins']}/{c['n_seeds']} seeds | {WORDS[c['verdict']]} |")
    return lines


def checkpoint_lines(choice: dict[str, Any] | None, pretrain_log: dict[str, Any]) -> list[str]:
    """Which checkpoint became the encoder, and how well RankMe tracked a labeled probe."""
    rule_of_log = pretrain_log.get("choice") or {}
    if choice is None and not rule_of_log:
        return ["The last checkpoint is the encoder (this pretraining run recorded no checkpoint choice)."]
    rule = (choice or {}).get("rule") or rule_of_log.get("rule")
    chosen = (choice or {}).get("chosen_step", rule_of_log.get("step"))
    logged_last = pretrain_log["checkpoints"][-1]["step"] if pretrain_log["checkpoints"] else None
    last = (choice or {}).get("last_step", logged_last)
    reason = str(rule_of_log.get("reason") or "").rstrip(".")
    if rule == "rankme":
        lines = [f"RankMe (Garrido et al., 2023), label-free, chose the checkpoint at step {chosen} "
                 f"(last: step {last})." + (f" Rule: {reason}." if reason else "")]
    elif reason and "rankme" in reason.lower():
        lines = [f"The last checkpoint (step {last}) is the encoder: {reason}."]
    else:
        lines = [f"The last checkpoint (step {last}) is the encoder" + (f" ({reason})" if reason else "")
                 + ". RankMe is validated as a label-free checkpoint choice for joint-embedding methods only; "
                 "for reconstruction objectives (MAE, MLM, TERA) it is not, so they use the last checkpoint."]
    if choice:
        metric = choice.get("metric", "score")
        tracked = []
        if choice.get("spearman") is not None:
            tracked.append(f"Spearman rank correlation between RankMe and a linear probe's validation "
                           f"{metric} across {len(choice.get('candidates', []))} checkpoints: "
                           f"{choice['spearman']:.2f}")
        if choice.get("gain_vs_last") is not None and chosen != last:
            tracked.append(f"the chosen checkpoint's validation {metric} minus the last one's: "
                           f"{choice['gain_vs_last']:+.3f}")
        if tracked:
            lines.append("How RankMe tracked the labels (probe trained on the pool's train rows, scored on its "
                         "validation rows; never the test set): " + "; ".join(tracked) + ".")
        if choice.get("note"):
            note = str(choice["note"])
            lines.append(note[:1].upper() + note[1:])
    lines = [part for line in lines for part in (line, "")]  # one paragraph each
    candidates = (choice or {}).get("candidates") or []
    if candidates:
        lines += [f"| step | RankMe | validation {choice.get('metric', 'score')} | |", "|---|---|---|---|"]
        for c in candidates:
            marks = [m for m, step in (("chosen", chosen), ("last", last)) if c["step"] == step]
            score = "–" if c.get("val_score") is None else f"{c['val_score']:.3f}"
            rankme = "–" if c.get("rankme") is None else f"{c['rankme']:.1f}"
            lines.append(f"| {c['step']} | {rankme} | {score} | {', '.join(marks)} |")
    return lines


def quarantine_lines(quarantine: list[dict[str, str]]) -> list[str]:
    """Counts per reason (no file names: they may identify a person)."""
    if not quarantine:
        return ["No file was quarantined."]
    reasons = Counter(q["reason"] for q in quarantine)
    return [(f"{len(quarantine)} quarantined (full list, by key, in the manifest's `quarantine.jsonl`, and for "
            "what preprocess set aside in the shards' `quarantine.jsonl`; keys are salted pseudonyms when the "
            "domain pseudonymises):"), ""] + [
        f"- {count} × {reason}" for reason, count in reasons.most_common(10)]


def all_quarantined(paths: DomainPaths) -> list[dict[str, str]]:
    """What ingest quarantined, then what preprocess did (a reason tagged `(in preprocess)`)."""
    quarantined = read_jsonl(paths.manifest / "quarantine.jsonl")
    if (paths.shards / "quarantine.jsonl").exists():
        quarantined += [{**row, "reason": f"{row['reason']} (in preprocess)"}
                        for row in read_jsonl(paths.shards / "quarantine.jsonl")]
    return quarantined


def baseline_description(domain: Domain) -> str | None:
    """The first sentence of the domain's baseline module docstring (what its features are)."""
    if not domain.has_baseline():
        return None
    doc = importlib.import_module(f"{domain.package}.baseline").__doc__ or ""
    first = re.sub(r"\s*\([^)]*\)", "", " ".join(doc.split()).split(". ")[0]).strip().rstrip(".")
    return first[:1].lower() + first[1:] if first else None


def build_markdown(domain_name: str, task: str, metrics: dict[str, Any], comparisons: list[dict[str, Any]],
                   ingest_summary: dict[str, Any], shards_summary: dict[str, Any],
                   pretrain_log: dict[str, Any], lineage_text: str, quarantine: list[dict[str, str]],
                   checkpoint_choice: dict[str, Any] | None = None, baseline_text: str | None = None,
                   has_embedding_plot: bool = False) -> str:
    last = pretrain_log["checkpoints"][-1]
    first = pretrain_log["checkpoints"][0]
    by_split = ", ".join(f"{count} {split}" for split, count in ingest_summary["labeled_by_split"].items())
    per_protocol = [c for c in comparisons if c["protocol"] != "best"]
    return "\n".join([
        f"# Domain pretraining report: {domain_name}",
        "",
        f"**Task.** {task}",
        "",
        f"**Data.** {ingest_summary['records']} records ingested from {ingest_summary['files']} files; "
        f"{ingest_summary['quarantined']} quarantined, {ingest_summary['duplicates_dropped']} exact duplicates "
        "dropped. "
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
        *verdict_lines(metrics, comparisons),
        "",
        *[part for line in method_lines(metrics, comparisons, baseline_text) for part in (line, "")],
        "",
        "## Results",
        "",
        (f"`{metrics['primary_metric']}` on the test set, mean ± std over seeds; each init's best protocol "
        "(in brackets), then every protocol. `n labels` and `n groups`: the labeled subset a fraction "
        "gives (mean over seeds; the same subsets for every init)."),
        "",
        *best_table(metrics),
        "",
        "Every protocol:",
        "",
        *results_table(metrics),
        "",
        "![label efficiency](label_efficiency.png)",
        "",
        "### Paired differences",
        "",
        *(comparisons_table(comparisons) if comparisons else ["No paired comparison: only one init ran."]),
        "",
        *(["Per-protocol rows compare the same protocol for both inits (no choice made on the test set)."]
          if per_protocol else []),
        "",
        *(["## Test set in 2D",
           "",
           ("Frozen test features of each init (first seed), projected to two dimensions, coloured by label: "
           "classes that separate here are easy for the linear probe."),
           "",
           "![test set embedding per init](embedding_2d.png)",
           ""] if has_embedding_plot else []),
        "## Pretraining",
        "",
        (f"{last['step']} steps; loss {first['loss']:.3f} at step {first['step']} → {last['loss']:.3f}; "
        f"RankMe {first['rankme']:.1f} → {last['rankme']:.1f}."),
        "",
        *checkpoint_lines(checkpoint_choice, pretrain_log),
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


def build_html(domain_name: str, text: str) -> str:
    """The Markdown as one self-contained page; tables wrapped so they scroll on their own."""
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    body = re.sub(r"<table>", '<div class="table-scroll"><table>', body)
    body = body.replace("</table>", "</table></div>")
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(domain_name)} report</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def report(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> str:
    domain_name = cfg.name
    metrics = read_json(paths.evaluation / "metrics.json")
    comparisons = read_json(paths.evaluation / "comparisons.json")
    pretrain_log = read_json(paths.pretrain / "log.json")
    embedding = optional_json(paths.evaluation / "embedding_2d.json")
    checkpoint_choice = optional_json(paths.evaluation / "checkpoint_choice.json")
    recorder = LineageRecorder(f"report@{domain_name}", paths.report, params={}, root=paths.root,
                               upstream=[paths.evaluation])
    uses_default = cfg.resolve(cfg.corpus).resolve().is_relative_to(paths.default_data.resolve())
    with atomic_dir(paths.report) as out:
        plot_label_efficiency(metrics["results"], metrics["primary_metric"], out / "label_efficiency.png",
                              metrics.get("best_protocols"))
        plot_pretraining(pretrain_log, out / "pretraining.png")
        has_embedding = bool(embedding and embedding.get("inits"))
        if has_embedding:
            plot_embeddings(embedding, out / "embedding_2d.png")
        text = build_markdown(domain_name, domain.task_description(cfg, uses_default), metrics, comparisons,
                              read_json(paths.manifest / "summary.json"), read_json(paths.shards / "summary.json"),
                              pretrain_log, show(paths.evaluation, paths.root, runs=False),
                              all_quarantined(paths), checkpoint_choice,
                              baseline_description(domain), has_embedding_plot=has_embedding)
        write_text(out / "report.md", text)
        write_text(out / "report.html", build_html(domain_name, text))
        recorder.write(out)
    log.info("report %s written to %s", domain_name, paths.report / "report.md")
    return text


def optional_json(path: Path) -> Any:
    """A file an older upstream stage did not write: None then."""
    return read_json(path) if path.exists() else None
