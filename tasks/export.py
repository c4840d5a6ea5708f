"""Hand a pretrained encoder over: `ssl-pipeline export <domain>` writes `models/<domain>/export/`
in the format the domain's field loads without this project (the domain's `export` hook), a
model card (`README.md`, Hugging Face front matter) and `manifest.json` (the sha256 of every
file); `ssl-pipeline export verify DIR` re-hashes a copy against its manifest.

The card's numbers come from the run's own files: the verdict from `reports/<d>/metrics.json`
when evaluate has run, the provenance from the pretrain stage's lineage record, so
`ssl-pipeline lineage verify models/<d>/pretrain` ties the card to the data, code and params.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from ssl_models.core.errors import PipelineError
from ssl_models.core.hashing import sha256_file
from tasks.io import atomic_dir, read_json
from tasks.lineage import RECORD_NAME, hash_outputs
from tasks.paths import DomainPaths

log = logging.getLogger("export")

MANIFEST = "manifest.json"
EXPORT_INITS = ("ssl", "generic")


def export(root: Path, domain_name: str, init: str = "ssl", out: Path | None = None) -> Path:
    """Export the `init` encoder (the pretrained one, or the generic checkpoint) of `domain_name`
    in the project `root` to `out` (default `models/<domain>/export`); returns the folder."""
    import torch

    from ssl_models.core.config import load_config

    if init not in EXPORT_INITS:
        raise PipelineError(f"export --init {init!r}: one of {', '.join(EXPORT_INITS)}")
    cfg, domain = load_config(domain_name, root / "params.yaml")
    paths = DomainPaths(domain_name, root)
    encoder_dir = paths.pretrain / "encoder"
    if init == "ssl" and not (paths.pretrain / "lineage.json").exists():
        raise PipelineError(f"no pretrained encoder at {paths.relative(encoder_dir)}: run "
                            f"`ssl-pipeline pretrain {domain_name}` (or `dvc repro pretrain@{domain_name}`) first")
    if init == "generic" and init not in domain.available_inits(cfg):
        raise PipelineError(f"domain {domain_name!r} has no generic checkpoint to export")
    target = out or root / "models" / domain_name / "export"
    encoder = domain.load_encoder(init, cfg, paths.shards, encoder_dir, seed=0).eval()
    with atomic_dir(target) as folder, torch.no_grad():
        about = domain.export(cfg, encoder, folder)
        card = model_card(cfg, domain, paths, init, about)
        (folder / "README.md").write_text(card, encoding="utf-8")
        if about.get("docs"):  # where the format keeps its own copy (a MONAI bundle's docs/README.md)
            (folder / about["docs"]).write_text(card, encoding="utf-8")
        write_manifest(folder)
        for path in folder.rglob("*"):  # for the team it is handed to: nothing private is in it
            path.chmod(0o755 if path.is_dir() else 0o644)
    log.info("export %s: %s encoder written to %s (%s)", domain_name, init, target, about["format"])
    return target


def write_manifest(folder: Path) -> None:
    manifest = {"algorithm": "sha256", "files": hash_outputs(folder, exclude=MANIFEST)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def verify(folder: Path) -> list[str]:
    """What differs between `folder` and its manifest: changed, missing and unlisted files."""
    manifest_file = folder / MANIFEST
    if not manifest_file.exists():
        return [f"{manifest_file}: no manifest (not an export folder)"]
    listed = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
    found = hash_outputs(folder, exclude=MANIFEST)
    return ([f"missing: {name}" for name in sorted(set(listed) - set(found))]
            + [f"not in the manifest: {name}" for name in sorted(set(found) - set(listed))]
            + [f"changed: {name}" for name in sorted(set(listed) & set(found)) if found[name] != listed[name]])


def _evaluation_rows(metrics: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[str]:
    """The card's evaluation tables: each init's best protocol per label fraction, and `ssl`
    against each alternative (report.verdict_table: the paired difference, interval, verdict)."""
    from tasks.stages.report import verdict_table

    rows = ["| label fraction | init | protocol | mean | seeds | test rows |", "|---|---|---|---|---|---|"]
    for row in metrics.get("best_protocols", []):
        rows.append(f"| {row['label_fraction']:g} | {row['init']} | {row['protocol']} | {row['mean']:.4f} "
                    f"| {row['n_seeds']} | {row['n_test']} |")
    rows += ["", f"`ssl` against each alternative, paired over seeds ({metrics.get('confidence', 0.95):.0%} "
             "intervals):", "", "| label fraction | against | difference | interval | verdict |", "|---|---|---|---|---|"]
    for row in verdict_table(metrics, comparisons):
        interval = "–" if row["interval"] is None else f"[{row['interval'][0]:+.4f}, {row['interval'][1]:+.4f}]"
        rows.append(f"| {row['label_fraction']:g} | {row['against']} | {row['difference']:+.4f} | {interval} "
                    f"| {row['verdict']} |")
    return rows


def model_card(cfg: Any, domain: Any, paths: DomainPaths, init: str, about: dict[str, Any]) -> str:
    """The export's README.md: Hugging Face front matter (with the verdict's numbers as a
    model-index where evaluate has run), how to load it, the evaluation, and the provenance."""
    metrics = read_json(paths.metrics) if paths.metrics.exists() else None
    lineage_file = paths.pretrain / RECORD_NAME
    lineage = read_json(lineage_file) if lineage_file.exists() else {}
    base = domain.generic_checkpoint(cfg) if init == "generic" else getattr(cfg.model, "base_checkpoint", None)
    front = {"library_name": about["library"], "tags": ["ssl-pipeline", cfg.name, "self-supervised",
                                                        "feature-extraction"],
             "pipeline_tag": "feature-extraction"}
    if metrics:
        front["model-index"] = [{"name": f"ssl-pipeline-{cfg.name}", "results": [
            {"task": {"type": "feature-extraction"},
             "dataset": {"type": "private", "name": f"{cfg.name} labeled set (test split)"},
             "metrics": [{"type": metrics["primary_metric"], "name": f"{row['init']} {row['protocol']} "
                          f"with {row['label_fraction']:.0%} of labels", "value": row["mean"]}
                         for row in metrics.get("best_protocols", []) if row["init"] in (init, "baseline")]}]}]
    lines = ["---", yaml.safe_dump(front, sort_keys=True).rstrip(), "---", "",
             f"# {cfg.name}: the `{init}` encoder of an ssl-pipeline run", "",
             f"{about['format'][0].upper()}{about['format'][1:]}. "
             + (f"Pretrained with `{cfg.pretrain.method}`, backbone `{cfg.model.backbone}`"
                + (f", continued from `{base}`." if base else ".") if init == "ssl"
                else f"The generic checkpoint `{base}` as published."), "",
             "## How to load it", "",
             f"With {about['library']} alone (no import of ssl-pipeline); `embed` takes {about['inputs']} "
             "and gives the embeddings the pipeline's probes were fitted on:", "", "```python",
             'FOLDER = "."  # this folder', about["snippet"].rstrip(), "```", "",
             f"`{MANIFEST}` holds the sha256 of every file; `ssl-pipeline export verify FOLDER` re-checks them.", "",
             "## Evaluation", ""]
    if metrics:
        lines += [f"Metric: {metrics['primary_metric']} on {metrics['labeled_test']} held-out test rows "
                  f"({metrics.get('labeled_test_in_pretraining_corpus', 0)} of them in the pretraining corpus). "
                  "`baseline` is the classical features a practitioner tries first, `generic` an off-the-shelf "
                  "checkpoint, `scratch` the same architecture untrained.", "",
                  *_evaluation_rows(metrics, read_json(paths.evaluation / "comparisons.json")), ""]
    else:
        lines += ["Not evaluated: this export was written before the evaluate stage ran "
                  "(`dvc repro` runs it; export again for the numbers).", ""]
    lines += ["## Provenance", "",
              f"- pretrain lineage record: `{paths.relative(lineage_file)}`, sha256 "
              f"`{sha256_file(lineage_file) if lineage_file.exists() else 'none'}`",
              f"- the encoder's outputs digest in it: `{lineage.get('outputs_digest', 'none')}`",
              f"- `ssl-pipeline lineage verify {paths.relative(paths.pretrain)}` re-hashes the data, code and "
              "params behind it. No raw record, no path of the corpus and no salt is in this folder.", ""]
    return "\n".join(lines)
