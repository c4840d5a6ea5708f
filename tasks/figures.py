"""Report figures: label-efficiency curves with spread, pretraining loss and RankMe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"ssl": ("tab:blue", "-"), "scratch": ("tab:gray", "--"), "generic": ("tab:orange", "-.")}


def plot_label_efficiency(summary: list[dict[str, Any]], metric: str, out: Path) -> None:
    protocols = sorted({r["protocol"] for r in summary})
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.4), squeeze=False)
    for axis, protocol in zip(axes[0], protocols):
        for init in sorted({r["init"] for r in summary}):
            rows = sorted((r for r in summary if (r["init"], r["protocol"], r["metric"]) == (init, protocol, metric)),
                          key=lambda r: r["label_fraction"])
            if not rows:
                continue
            x = [100 * r["label_fraction"] for r in rows]
            mean = [r["mean"] for r in rows]
            std = [r["std"] for r in rows]
            color, line = STYLE.get(init, (None, "-"))
            axis.plot(x, mean, line, marker="o", color=color, label=init)
            axis.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=color, alpha=0.15)
        axis.set_xscale("log")
        ticks = sorted({100 * r["label_fraction"] for r in summary})
        axis.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("labels used (% of training labels)")
        axis.set_ylabel(metric)
        axis.set_title(protocol)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_pretraining(pretrain_log: dict[str, Any], out: Path) -> None:
    fig, (loss_axis, rank_axis) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    steps, losses = zip(*pretrain_log["loss"])
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3, label="per step")
    points = pretrain_log["checkpoints"]
    loss_axis.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", color="tab:blue",
                   label="mean per checkpoint")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("pretraining loss")
    loss_axis.legend()
    rank_axis.plot([p["step"] for p in points], [p["rankme"] for p in points], "o-", color="tab:green")
    rank_axis.set_xlabel("step")
    rank_axis.set_ylabel(f"RankMe ({pretrain_log.get('rankme_rows', 'val')} rows)")
    for axis in (loss_axis, rank_axis):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
