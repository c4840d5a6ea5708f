"""What every benchmark does: copy the project, reproduce a domain's stages one by one, timed.

Benchmarks import nothing from tests/; the test suite imports `copy_project_code` from here.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent
sys.path.insert(0, str(REPO))
from ssl_models.core.offline import OFFLINE_ENV  # noqa: E402
from tasks.cli import STAGES  # noqa: E402


def stage_env() -> dict[str, str]:
    """The stages call `ssl-pipeline`: this environment's scripts first on PATH, offline settings on."""
    return {**os.environ, **{k: os.environ.get(k, v) for k, v in OFFLINE_ENV.items()},
            "PATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}"}


def copy_project_code(folder: Path) -> None:
    """Make `folder` a DVC project running this checkout's stages (git + dvc initialised)."""
    for name in ("ssl_models", "tasks", "flows"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", folder / ".gitignore")
    run = lambda *args: subprocess.run(args, cwd=folder, check=True, capture_output=True, env=stage_env())  # noqa: E731
    run("git", "init", "-q")
    run(str(SCRIPTS / "dvc"), "init", "-q")
    run(str(SCRIPTS / "dvc"), "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=folder, env=stage_env(), check=True,
                          capture_output=True, text=True)


def reproduce_stages(folder: Path, domain: str, stages: list[str] | tuple[str, ...]) -> list[tuple[str, float]]:
    """`dvc repro -s <stage>@<domain>` for each stage in order; (stage, seconds) each."""
    timings = []
    for stage in stages:
        started = time.perf_counter()
        dvc(folder, "repro", "-s", f"{stage}@{domain}")
        timings.append((stage, time.perf_counter() - started))
    return timings


def apply_override(block: dict, assignment: str) -> None:
    """`pretrain.steps=300` -> block["pretrain"]["steps"] = 300 (value parsed as YAML)."""
    dotted, _, value = assignment.partition("=")
    *parents, leaf = dotted.split(".")
    target = block
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = yaml.safe_load(value)


def run_on_shared_data(domain: str, overrides: dict, assignments: list[str], layout: Callable[[Path], int],
                       title: str, shown: tuple[str, ...]) -> dict:
    """The default block of `domain` with `overrides` and `--set` assignments, on a corpus that
    `layout(folder)` writes (returning its file count), every stage through DVC; prints the
    settings and stage timings and returns metrics.json (with the paired `comparisons`)."""
    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"][domain]
    for section, values in overrides.items():
        block[section] = {**block.get(section, {}), **values} if isinstance(values, dict) else values
    for assignment in assignments:
        apply_override(block, assignment)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_files = layout(folder)
        (folder / "params.yaml").write_text(yaml.safe_dump({"domains": {domain: block}}, sort_keys=False))
        copy_project_code(folder)
        timings = reproduce_stages(folder, domain, STAGES[1:])
        metrics = yaml.safe_load((folder / "reports" / domain / "metrics.json").read_text())
        evaluation = folder / "reports" / domain / "evaluation"
        metrics["comparisons"] = yaml.safe_load((evaluation / "comparisons.json").read_text())
        metrics["finetune_results"] = json.loads((folder / "models" / domain / "finetune" / "results.json").read_text())
        if (evaluation / "checkpoint_choice.json").exists():
            metrics["checkpoint_choice"] = yaml.safe_load((evaluation / "checkpoint_choice.json").read_text())
    print(f"{title}: {n_files} files; machine: {platform.machine()}, {os.cpu_count()} cores")
    print("settings:", yaml.safe_dump({k: block[k] for k in shown}, default_flow_style=True, width=10_000).strip())
    print(" ".join(f"{stage} {seconds:.0f}s" for stage, seconds in timings), f"total {sum(s for _, s in timings):.0f}s")
    return metrics


def print_comparison(metrics: dict, unit: str, comparisons: list[dict] | None = None) -> None:
    """Per label fraction: each init's best protocol (mean ± std over seeds, labels and groups),
    ssl minus each other init with its paired bootstrap interval, and how RankMe tracked."""
    comparisons = comparisons if comparisons is not None else metrics.get("comparisons", [])
    best = {(r["init"], r["label_fraction"]): r for r in metrics.get("best_protocols", [])}
    inits = [i for i in ("ssl", "scratch", "generic", "baseline") if any(k[0] == i for k in best)]
    paired = {(c["against"], c["label_fraction"]): c for c in comparisons if c.get("protocol") == "best"}
    print(f"{metrics['primary_metric']} on {metrics['labeled_test']} test {unit}; each init's best protocol, "
          "mean ± std over seeds; ssl − other with its paired bootstrap interval")
    print(f"{'labels':>7}{'n lab':>7}{'groups':>7}" + "".join(f"{i:>22}" for i in inits)
          + "".join(f"{'ssl − ' + i:>26}" for i in inits if i != "ssl"))
    for fraction in sorted({k[1] for k in best}):
        ssl = best.get(("ssl", fraction), {})
        cells = "".join(f"{best[(i, fraction)]['mean']:>9.3f} ± {best[(i, fraction)]['std']:.3f} "
                        f"{best[(i, fraction)]['protocol'][:3]:>4}" if (i, fraction) in best else f"{'–':>22}"
                        for i in inits)
        diffs = ""
        for i in inits[1:]:
            c = paired.get((i, fraction))
            if c is None:
                diffs += f"{'–':>26}"
            elif c.get("interval"):
                diffs += f"{c['mean_difference']:>+10.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}]"
            else:
                diffs += f"{c['mean_difference']:>+26.3f}"
        print(f"{fraction:>7.0%}{ssl.get('n_train', ''):>7}{ssl.get('n_groups', ''):>7}{cells}{diffs}")
    choice = metrics.get("checkpoint_choice")
    if choice:
        print(f"checkpoint choice: {choice.get('rule')} -> step {choice.get('chosen_step')} (last "
              f"{choice.get('last_step')}); Spearman(RankMe, val probe) {choice.get('spearman')}; "
              f"gain vs last {choice.get('gain_vs_last')}; {choice.get('note', '')}")
