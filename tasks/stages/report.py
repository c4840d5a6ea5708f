"""report: Markdown and HTML with the verdict per label fraction, figures and lineage.

The verdict answers the question the pipeline exists for: did pretraining on our own data pay
off? Per label fraction it names the best init and judges the domain-pretrained encoder
against each init a practitioner could use instead (scratch, the classical baseline, the
generic checkpoint) by the paired difference and its bootstrap interval; where pretraining
does not beat all of them, it says what to use instead.
"""

from __future__ import annotations

import html
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import markdown
from markupsafe import Markup, escape

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

# what a practitioner pays to get each init, least first: the advice picks the cheapest of equals
COST_ORDER = ("baseline", "generic", "scratch", "ssl")
TEMPLATES = Path(__file__).parents[1] / "templates"


def unbroken(text: str) -> str:
    """A table cell's figure kept on one line (no-break spaces): the cell wraps only between figures."""
    return text.replace(" ", "\u00a0")


def percent(fraction: float) -> str:
    return f"{fraction:.0%}"


def html_entities(text: str) -> Markup:
    """`text` escaped with html.escape's entities (`&#x27;`, `&quot;`, where markupsafe writes `&#39;`,
    `&#34;`), so pages stay byte-identical to those rendered before the templates."""
    return Markup(html.escape(text))


# Markdown characters that start markup anywhere in a line (python-markdown's and CommonMark's
# backslash escapes both cover them): `\` first, so the escapes added are not escaped again; `_` only
# where it can open or close emphasis (intra-word, as in `my_labels.csv`, it cannot in either).
MARKDOWN_INLINE = re.compile(r"[\\`*\[\]|]|(?<![^\W_])_|_(?![^\W_])")
# ... and those that start a block at the start of a line: a heading, a list item, an ordered list's number
MARKDOWN_LEADING = re.compile(r"^(\d*)([#+-]|(?<=\d)[.)])")


def markdown_text(value: Any) -> str:
    """A string from the data or the file system (a path, label, reason, group name) as Markdown that
    renders as exactly that text: on one line, Markdown's active characters backslash-escaped, HTML's
    (`& < > " '`) as entities, so neither the page nor a Markdown viewer makes markup of it."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(value))  # a line break would end a list item or a table row
    text = MARKDOWN_INLINE.sub(r"\\\g<0>", text)
    text = MARKDOWN_LEADING.sub(r"\1\\\2", text)
    return str(escape(text))


def code_span(value: Any) -> str:
    """`value` as one Markdown code span, whatever backticks it holds (a fence longer than its longest run)."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(value))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def code_fence(text: str) -> str:
    """The fence of a code block that holds `text` whole: ``` unless a line of it could close that."""
    return "`" * max(3, max(map(len, re.findall("`+", text)), default=0) + 1)


def task_sentence(domain: Domain, cfg: DomainConfig, uses_default: bool) -> str:
    """The domain's one-sentence task (Markdown: its code spans are meant), with the labels file's path in
    it escaped (`markdown_text`): the path is the user's, and may hold anything a folder name can."""
    text = domain.task_description(cfg, uses_default)
    labels = str(cfg.labels) if cfg.labels is not None else ""
    return text.replace(labels, markdown_text(labels)) if labels else text


# The HTML page is escaped by Jinja; the Markdown templates print data through `md` (markdown_text), code
# through `code_span`, and what the templates and the stages word themselves as given: it is Markdown.
ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
ENVIRONMENT.filters.update(percent=percent, unbroken=unbroken, html_entities=html_entities, md=markdown_text,
                           code_span=code_span, code_fence=code_fence)


def best_of(metrics: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    """Each init's best protocol per fraction, as the evaluate stage chose it: (init, fraction) -> row."""
    return {(row["init"], row["label_fraction"]): row for row in metrics.get("best_protocols", [])}


def alternatives(comparisons: list[dict[str, Any]]) -> list[str]:
    """The inits ssl is compared with, in the evaluate stage's order (scratch, baseline, generic)."""
    return list(dict.fromkeys(c["against"] for c in comparisons))


def verdict_table(metrics: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ssl` against each alternative per label fraction (best protocol against best protocol), as
    rows: both means, the paired difference, its interval (None without per-row predictions) and
    the evaluate stage's verdict. What the flow publishes and the export's model card shows."""
    best = best_of(metrics)
    return [{"label_fraction": c["label_fraction"], "against": c["against"],
             "ssl": best.get(("ssl", c["label_fraction"]), {}).get("mean"),
             "alternative": best.get((c["against"], c["label_fraction"]), {}).get("mean"),
             "difference": c["mean_difference"], "interval": c["interval"], "verdict": c["verdict"]}
            for c in sorted((c for c in comparisons if c["protocol"] == "best"), key=lambda c: c["label_fraction"])]


def subset_of(metrics: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The result row that gives a fraction's label subset (labels, groups, seeds: the same for every init)."""
    rows = [r for r in metrics["results"]
            if r["label_fraction"] == fraction and r["metric"] == metrics["primary_metric"]]
    return next((r for r in rows if r["init"] == "ssl"), rows[0])


def advice(best: dict[str, dict[str, Any]], judged: dict[str, dict[str, Any]], paid_off: bool) -> dict[str, Any]:
    """What a practitioner should use at one fraction; verdict.md.j2's `advice` words it."""
    if paid_off:
        return {"kind": "ssl", "protocol": best["ssl"]["protocol"]}
    top = max(best, key=lambda init: best[init]["mean"])
    if top != "ssl":
        return {"kind": "top", "init": top, "protocol": best[top]["protocol"],
                "within": judged.get(top, {}).get("verdict") == "no clear difference"}
    level = [init for init, c in judged.items() if c["verdict"] != "better"]
    if not level:
        return {"kind": "run", "missing": [i for i in ("baseline", "generic") if i not in judged]}
    cheapest = min(level, key=COST_ORDER.index)
    return {"kind": "cheaper", "level": level, "init": cheapest, "protocol": best[cheapest]["protocol"]}


def verdicts(metrics: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label fraction: the best init, ssl against each alternative (best protocol against best
    protocol), whether pretraining paid off (`outcome`, None with nothing to compare) and the advice."""
    best_rows = best_of(metrics)
    found = []
    for fraction in sorted({f for _, f in best_rows}):
        best = {init: row for (init, f), row in best_rows.items() if f == fraction}
        judged = {c["against"]: c for c in comparisons
                  if c["protocol"] == "best" and c["label_fraction"] == fraction}
        judged = {init: judged[init] for init in alternatives(comparisons) if init in judged}
        verdict = {"fraction": fraction, "subset": subset_of(metrics, fraction), "best": best, "judged": judged,
                   "top": max(ordered_inits(best), key=lambda init: best[init]["mean"]), "outcome": None}
        if "ssl" in best and judged:
            beats_all = all(c["verdict"] == "better" for c in judged.values())
            paid_off = beats_all and "baseline" in judged  # the only "paid off"
            verdict["outcome"] = "paid off" if paid_off else "no baseline" if beats_all else "not paid off"
            verdict["advice"] = advice(best, judged, paid_off)
            verdict["shortfall"] = None if beats_all else shortfall(judged)
        found.append(verdict)
    return found


def shortfall(judged: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How far ssl was from paying off at one fraction: the alternative it is furthest from
    beating (the lowest lower end of the paired interval, else the lowest mean difference) and
    how much `ssl` would have to gain for that interval to clear zero (its lower end, negated)."""
    def lower(comparison: dict[str, Any]) -> float:
        interval = comparison.get("interval")
        return interval[0] if interval is not None else comparison["mean_difference"]

    init = min((i for i, c in judged.items() if c["verdict"] != "better"), key=lambda i: lower(judged[i]))
    return {"init": init, "comparison": judged[init], "needed": -lower(judged[init])}


def next_steps(cfg: DomainConfig, found: list[dict[str, Any]], pretrain_steps: int) -> list[str]:
    """The knobs a user would turn next where pretraining did not pay off, from what this run
    was: longer pretraining, continued pretraining of the generic checkpoint (a `dapt` preset)
    instead of from scratch, the larger preset on GPUs. Empty where it paid off everywhere."""
    if not any(v.get("shortfall") for v in found):
        return []
    where = f"domains.{cfg.name}"
    steps = [f"More pretraining: this run trained {pretrain_steps} steps (`{where}.pretrain.steps`, "
             "`pretrain.batch_size`; with `pretrain.epochs` set, the passes over the corpus, steps their cap); "
             "the CPU defaults are sized for a first look, not for a verdict."]
    generic_ahead = any(v["best"].get("generic", {}).get("mean", float("-inf")) > v["best"]["ssl"]["mean"]
                        for v in found if v.get("shortfall") and "ssl" in v["best"])
    continued = cfg.preset == "dapt"  # this run already continued the generic checkpoint
    if "dapt" in cfg.presets and not continued:
        steps.append("Continue pretraining the generic checkpoint on your corpus instead of starting from scratch "
                     f"(`dvc exp run -S {where}.preset=dapt`){': it is ahead of `ssl` here' if generic_ahead else ''}; "
                     "the verdict then asks whether the domain tokens added anything to that same checkpoint.")
    elif generic_ahead and not continued:
        steps.append("The generic checkpoint is ahead of `ssl`: set `model.base_checkpoint` to it (where the "
                     "domain's backbone can load it) to continue pretraining from it instead of from scratch.")
    if "large" in cfg.presets and cfg.preset != "large":
        steps.append(f"The larger encoder of the `large` preset on one or more GPUs (`dvc exp run -S {where}.preset=large`, "
                     "`pretrain.nproc: auto` trains on every visible GPU).")
    return steps


def table_rows(results: list[dict[str, Any]], key: Any) -> list[tuple]:
    """Rows of results grouped by `key(row)` in sorted order: (*key, first, {init: row}), where
    `first` (ssl's row, else the first) gives the label subset's size."""
    groups: dict[Any, dict[str, dict[str, Any]]] = {}
    for row in results:
        groups.setdefault(key(row), {})[row["init"]] = row
    return [(*group, cells.get("ssl") or next(iter(cells.values())), cells)
            for group, cells in sorted(groups.items(), key=lambda item: item[0])]


def checkpoint_story(choice: dict[str, Any] | None, pretrain_log: dict[str, Any]) -> dict[str, Any] | None:
    """Which checkpoint became the encoder and how RankMe tracked a labeled probe (None: no choice recorded)."""
    rule_of_log = pretrain_log.get("choice") or {}
    if choice is None and not rule_of_log:
        return None
    choice = choice or {}
    chosen = choice.get("chosen_step", rule_of_log.get("step"))
    logged_last = pretrain_log["checkpoints"][-1]["step"] if pretrain_log["checkpoints"] else None
    last = choice.get("last_step", logged_last)
    note = str(choice.get("note") or "")
    candidates = choice.get("candidates") or []
    return {"rule": choice.get("rule") or rule_of_log.get("rule"), "chosen": chosen, "last": last,
            "reason": str(rule_of_log.get("reason") or "").rstrip("."),
            "metric": choice.get("metric", "score"),
            "spearman": choice.get("spearman"),
            "gain": choice.get("gain_vs_last") if chosen != last else None,  # no gain against itself
            "note": note[:1].upper() + note[1:],
            "candidates": [{**c, "marks": [m for m, step in (("chosen", chosen), ("last", last)) if c["step"] == step]}
                           for c in candidates]}


def all_quarantined(paths: DomainPaths) -> list[dict[str, str]]:
    """What ingest quarantined, then what preprocess did (a reason tagged `(in preprocess)`)."""
    quarantined = read_jsonl(paths.manifest / "quarantine.jsonl")
    if (paths.shards / "quarantine.jsonl").exists():
        quarantined += [{**row, "reason": f"{row['reason']} (in preprocess)"}
                        for row in read_jsonl(paths.shards / "quarantine.jsonl")]
    return quarantined


def build_markdown(domain_name: str, task: str, metrics: dict[str, Any], comparisons: list[dict[str, Any]],
                   ingest_summary: dict[str, Any], shards_summary: dict[str, Any],
                   pretrain_log: dict[str, Any], lineage_text: str, quarantine: list[dict[str, str]],
                   checkpoint_choice: dict[str, Any] | None = None, baseline_text: str | None = None,
                   has_embedding_plot: bool = False, cfg: DomainConfig | None = None) -> str:
    """The report's Markdown: report.md.j2 filled with what these inputs say."""
    primary = metrics["primary_metric"]
    results = [r for r in metrics["results"] if r["metric"] == primary]
    inits = {r["init"] for r in metrics["results"]}
    with_interval = [c for c in comparisons if c.get("interval") is not None]
    order = alternatives(comparisons)
    found = verdicts(metrics, comparisons)
    return ENVIRONMENT.get_template("report.md.j2").render(
        domain_name=domain_name, task=task, metrics=metrics, ingest=ingest_summary, shards=shards_summary,
        primary=primary, unit=metrics.get("comparison_metric", primary),
        quarantined=len(quarantine), quarantine_reasons=Counter(q["reason"] for q in quarantine).most_common(10),
        verdicts=found,
        next_steps=next_steps(cfg, found, pretrain_log["checkpoints"][-1]["step"]) if cfg is not None else [],
        inits=inits, not_run=[i for i in ("generic", "baseline") if i not in inits], baseline_text=baseline_text,
        interval={"confidence": metrics.get("confidence") or with_interval[0]["confidence"],
                  "samples": with_interval[0]["bootstrap_samples"]} if with_interval else None,
        best_inits=ordered_inits({i for i, _ in best_of(metrics)}),
        best_rows=table_rows(metrics.get("best_protocols", []), lambda r: (r["label_fraction"],)),
        result_inits=ordered_inits({r["init"] for r in results}),
        result_rows=table_rows(results, lambda r: (r["protocol"], r["label_fraction"])),
        comparisons=sorted(comparisons, key=lambda c: (c["label_fraction"], order.index(c["against"]),
                                                      c["protocol"] != "best", c["protocol"])),
        per_protocol=any(c["protocol"] != "best" for c in comparisons), has_embedding_plot=has_embedding_plot,
        budget=metrics.get("finetune_budget", []),
        first=pretrain_log["checkpoints"][0], last=pretrain_log["checkpoints"][-1],
        checkpoint=checkpoint_story(checkpoint_choice, pretrain_log), lineage_text=lineage_text)


def build_html(domain_name: str, text: str) -> str:
    """The Markdown as one self-contained page; tables wrapped so they scroll on their own."""
    converter = markdown.Markdown(extensions=["tables", "fenced_code"])
    # raw HTML stays text: the templates write none and escape every value from the data (`md`), so this
    # only keeps a value a template missed from becoming a tag (python-markdown has no safe mode any more)
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(text)
    body = body.replace("<table>", '<div class="table-scroll"><table>').replace("</table>", "</table></div>")
    return ENVIRONMENT.get_template("report.html.j2").render(domain_name=domain_name, body=Markup(body))


def report(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> str:
    domain_name = cfg.name
    metrics = read_json(paths.evaluation / "metrics.json")
    comparisons = read_json(paths.evaluation / "comparisons.json")
    pretrain_log = read_json(paths.pretrain / "log.json")
    embedding = optional_json(paths.evaluation / "embedding_2d.json")
    checkpoint_choice = optional_json(paths.evaluation / "checkpoint_choice.json")
    recorder = LineageRecorder(f"report@{domain_name}", paths.report, params={}, root=paths.root,
                               upstream=[paths.evaluation])
    uses_default = uses_default_data(cfg, paths)
    with atomic_dir(paths.report) as out:
        plot_label_efficiency(metrics["results"], metrics["primary_metric"], out / "label_efficiency.png",
                              metrics.get("best_protocols"))
        plot_pretraining(pretrain_log, out / "pretraining.png")
        has_embedding = bool(embedding and embedding.get("inits"))
        if has_embedding:
            plot_embeddings(embedding, out / "embedding_2d.png")
        text = build_markdown(domain_name, task_sentence(domain, cfg, uses_default), metrics, comparisons,
                              read_json(paths.manifest / "summary.json"), read_json(paths.shards / "summary.json"),
                              pretrain_log, show(paths.evaluation, paths.root, runs=False),
                              all_quarantined(paths), checkpoint_choice,
                              domain.baseline_description(), has_embedding_plot=has_embedding, cfg=cfg)
        write_text(out / "report.md", text)
        write_text(out / "report.html", build_html(domain_name, text))
        recorder.write(out)
    log.info("report %s written to %s", domain_name, paths.report / "report.md")
    return text


def uses_default_data(cfg: DomainConfig, paths: DomainPaths) -> bool:
    """Whether the block's corpus is the embedded default data (the task is then described as such)."""
    return cfg.resolve(cfg.corpus).resolve().is_relative_to(paths.default_data.resolve())


def optional_json(path: Path) -> Any:
    """A file an older upstream stage did not write: None then."""
    return read_json(path) if path.exists() else None
