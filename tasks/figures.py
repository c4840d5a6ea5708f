"""Report figures: label-efficiency curves with spread, the test set's 2D embedding per init,
pretraining loss and RankMe with the chosen checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

INIT_ORDER = ("ssl", "generic", "scratch", "baseline")
# (colour, line style, marker) per init; the baseline is dotted: a reference, not a model of ours
STYLE = {"ssl": ("tab:blue", "-", "o"), "scratch": ("tab:gray", "--", "o"), "generic": ("tab:orange", "-.", "^"),
         "baseline": ("tab:green", ":", "s")}
DPI = 110
# Text in the figures comes from the data (class names, protocol and init names): drawn as written, never
# parsed as mathtext or LaTeX, where `$\undefinedmacro{x}$` in a label would stop the report stage.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}


def ordered_inits(inits: set[str] | list[str]) -> list[str]:
    return sorted(inits, key=lambda i: (INIT_ORDER.index(i) if i in INIT_ORDER else len(INIT_ORDER), i))


@plt.rc_context(LITERAL_TEXT)
def plot_label_efficiency(summary: list[dict[str, Any]], metric: str, out: Path,
                          best: list[dict[str, Any]] | None = None) -> None:
    """A panel with each init's `best` protocol (when given), then one per protocol; two panels
    a row, so the figure keeps a readable size in a report column."""
    protocols = sorted({r["protocol"] for r in summary})
    panels = ["best"] + protocols if best and len(protocols) > 1 else protocols
    rows = summary + [{**row, "protocol": "best"} for row in best or []]
    columns = min(2, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.4 * lines), squeeze=False)
    ticks = sorted({100 * r["label_fraction"] for r in summary})
    for axis, panel in zip(axes.flat, panels):
        for init in ordered_inits({r["init"] for r in summary}):
            series = sorted((r for r in rows if (r["init"], r["protocol"], r["metric"]) == (init, panel, metric)),
                            key=lambda r: r["label_fraction"])
            if not series:
                continue
            x = [100 * r["label_fraction"] for r in series]
            mean = [r["mean"] for r in series]
            std = [r["std"] for r in series]
            color, line, marker = STYLE.get(init, (None, "-", "o"))
            axis.plot(x, mean, line, marker=marker, color=color, label=init)
            axis.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=color, alpha=0.12)
        axis.set_xscale("log")
        axis.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("labels used (% of training labels)")
        axis.set_ylabel(metric)
        axis.set_title("best protocol of each init" if panel == "best" else panel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


@plt.rc_context(LITERAL_TEXT)
def plot_embeddings(embedding: dict[str, Any], out: Path) -> None:
    """The test set's frozen features projected to 2D, one panel per init, coloured by label."""
    inits = ordered_inits(embedding["inits"])
    labels = embedding["labels"]
    classes = embedding.get("classes") or [str(i) for i in range(max(labels, default=-1) + 1)]
    columns = min(4, len(inits))
    lines = math.ceil(len(inits) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.9 * columns, 2.9 * lines + 0.9), squeeze=False)
    colormap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for axis, init in zip(axes.flat, inits):
        points = embedding["inits"][init]
        for index, name in enumerate(classes):
            members = [p for p, label in zip(points, labels) if label == index]
            if members:
                axis.scatter([p[0] for p in members], [p[1] for p in members], s=9, alpha=0.75,
                             color=colormap(index % colormap.N), label=name, linewidths=0)
        axis.set_title(init)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(inits):]:
        axis.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    shown = min(len(handles), 20)  # a legend of hundreds of classes says nothing
    fig.legend(handles[:shown], names[:shown], loc="lower center", ncol=min(shown, 5), fontsize="small",
               markerscale=1.5, frameon=False)
    fig.suptitle(f"test set, frozen features, {embedding.get('method', 'pca').upper()} to 2D", fontsize="medium")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * math.ceil(shown / 5), 1, 1))
    fig.savefig(out, dpi=DPI, bbox_inches="tight", pad_inches=0.08)  # the last panel's frame stays inside
    plt.close(fig)


@plt.rc_context(LITERAL_TEXT)
def plot_pretraining(pretrain_log: dict[str, Any], out: Path) -> None:
    fig, (loss_axis, rank_axis) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    steps, losses = zip(*pretrain_log["loss"])
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3, label="per step")
    points = pretrain_log["checkpoints"]
    loss_axis.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", color="tab:blue",
                   label="mean per checkpoint")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("pretraining loss")
    rank_axis.plot([p["step"] for p in points], [p["rankme"] for p in points], "o-", color="tab:green")
    rank_axis.set_xlabel("step")
    rank_axis.set_ylabel(f"RankMe ({pretrain_log.get('rankme_rows', 'val')} rows)")
    choice = pretrain_log.get("choice")
    if choice and choice.get("step") is not None:
        for axis in (loss_axis, rank_axis):
            axis.axvline(choice["step"], color="tab:red", linestyle=":", label=f"encoder ({choice.get('rule')})")
        rank_axis.legend(fontsize="small")
    loss_axis.legend(fontsize="small")
    for axis in (loss_axis, rank_axis):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
