"""Hand a pretrained encoder over: `ssl-pipeline export <domain>` writes `models/<domain>/export/`
in the format the domain's field loads without this project (the domain's `export` hook), a
model card (`README.md`, Hugging Face front matter) and `manifest.json` (the sha256 of every
file); `ssl-pipeline export verify DIR` re-hashes a copy against its manifest.

`ssl_pipeline.json` carries the exporting block's settings (readers, preprocessing, model, whether
keys are pseudonymised; no path, no salt, no corpus): with it another team that installed this
project embeds a new folder as the pipeline did (`ssl-pipeline embed EXPORT_DIR FOLDER`), without
the exporter's params.yaml (`read_settings`).

The card's numbers come from the run's own files: the verdict from `reports/<d>/evaluation/`
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
SETTINGS = "ssl_pipeline.json"
HAND_OVER_INITS = ("ssl", "generic")  # what export and embed take: the pretrained encoder, the generic checkpoint
SETTINGS_VERSION = 1
# settings that hold a path on the exporter's machine: left out of ssl_pipeline.json (only that they
# were set is kept); where the export is used, they name the export folder itself, which holds the
# weights the encoder has now (a base checkpoint's vocabulary included)
WITHHELD = ("model.base_checkpoint",)


def export(root: Path, domain_name: str, init: str = "ssl", out: Path | None = None,
           finetuned: float | None = None) -> Path:
    """Export the `init` encoder (the pretrained one, or the generic checkpoint) of `domain_name`
    in the project `root` to `out` (default `models/<domain>/export`, the stage's, for the pretrained
    encoder; `export-generic`, `export-finetuned-<fraction>` beside it for the others); with `finetuned`, the
    pretrained encoder as the finetune stage fine-tuned it on that fraction of the labels, with its
    classification head. Returns the folder."""
    from ssl_models.core.config import load_config

    cfg, domain = load_config(domain_name, root / "params.yaml")
    paths = DomainPaths(domain_name, root)
    # the stage's own output (a DVC out) is the pretrained encoder's; the others go beside it
    variant = f"-finetuned-{finetuned:g}" if finetuned is not None else "" if init == "ssl" else f"-{init}"
    return write_export(cfg, domain, paths, init, out or paths.export.with_name(f"export{variant}"), finetuned)


def finetuned_model(paths: DomainPaths, fraction: float) -> Path:
    """The finetune stage's saved `ssl` model at `fraction` (its first seed's)."""
    saved = {}
    for folder in sorted((paths.finetune / "models").glob("ssl_fraction-*_seed-*")):
        value = folder.name[len("ssl_fraction-"):].partition("_seed-")[0]
        saved.setdefault(float(value), folder)
    if fraction not in saved:
        offered = ", ".join(f"{value:g}" for value in sorted(saved)) or "none (run the finetune stage first)"
        raise PipelineError(f"export --finetuned {fraction:g}: no fine-tuned model at that label fraction in "
                            f"{paths.relative(paths.finetune)}; saved: {offered}")
    return saved[fraction]


def check_init(init: str, command: str) -> None:
    if init not in HAND_OVER_INITS:
        raise PipelineError(f"{command} --init {init!r}: one of {', '.join(HAND_OVER_INITS)}")


def encoder_folder(cfg: Any, domain: Any, paths: DomainPaths, init: str, command: str) -> Path:
    """What `export` and `embed` check before `domain.load_encoder(init, ...)`, each in one line:
    the init, the pretrained encoder's lineage record (written last: the encoder is whole), the
    generic checkpoint. Returns the pretrained encoder's folder."""
    check_init(init, command)
    encoder_dir = paths.pretrain / "encoder"
    if init == "ssl" and not (paths.pretrain / RECORD_NAME).exists():
        raise PipelineError(f"no pretrained encoder at {paths.relative(encoder_dir)}: run "
                            f"`ssl-pipeline pretrain {cfg.name}` (or `dvc repro pretrain@{cfg.name}`) first")
    if init == "generic" and init not in domain.available_inits(cfg):
        raise PipelineError(f"{command} --init generic: domain {cfg.name!r} has no generic checkpoint (set "
                            f"domains.{cfg.name}.finetune.generic_checkpoint in params.yaml)")
    return encoder_dir


def write_export(cfg: Any, domain: Any, paths: DomainPaths, init: str, target: Path,
                 finetuned: float | None = None) -> Path:
    """The export of the parsed domain block: the domain's `export` hook, the card, the manifest."""
    import shutil

    import torch

    encoder_dir = encoder_folder(cfg, domain, paths, init, "export")
    if finetuned is not None and init != "ssl":
        raise PipelineError("export --finetuned exports the fine-tuned `ssl` encoder: leave out --init")
    model_dir = finetuned_model(paths, finetuned) if finetuned is not None else None
    encoder = domain.load_encoder(init, cfg, paths.shards, model_dir / "encoder" if model_dir else encoder_dir,
                                  seed=0).eval()
    with atomic_dir(target) as folder, torch.no_grad():
        about = domain.export(cfg, encoder, folder)
        if model_dir is not None:  # the classifier the encoder was fine-tuned with
            shutil.copyfile(model_dir / "head.safetensors", folder / "head.safetensors")
            shutil.copyfile(model_dir / "classes.json", folder / "classes.json")
            about = {**about, "finetuned": {"fraction": finetuned, "model": model_dir.name}}
        (folder / SETTINGS).write_text(json.dumps(export_settings(cfg, domain, init), indent=1, sort_keys=True)
                                       + "\n", encoding="utf-8")
        card = model_card(cfg, domain, paths, init, about)
        (folder / "README.md").write_text(card, encoding="utf-8")
        if about.get("docs"):  # where the format keeps its own copy (a MONAI bundle's docs/README.md)
            (folder / about["docs"]).write_text(card, encoding="utf-8")
        write_manifest(folder)
        for path in folder.rglob("*"):  # for the team it is handed to: nothing private is in it
            path.chmod(0o755 if path.is_dir() else 0o644)
    log.info("export %s: %s encoder written to %s (%s)", cfg.name, init, paths.relative(target), about["format"])
    return target


def export_settings(cfg: Any, domain: Any, init: str) -> dict[str, Any]:
    """ssl_pipeline.json: the block's sections as the run used them (ingest, preprocess, model, the
    method and its options, fine-tuning's precision, whether keys are pseudonymised), its preset
    applied; no corpus, labels, salt file or other path (`WITHHELD`), nothing of the data."""
    from ssl_models.core.config import section_params

    sections = {"ingest": section_params(cfg.ingest), "preprocess": section_params(cfg.preprocess),
                "model": section_params(cfg.model),
                "pretrain": {"method": cfg.pretrain.method, "options": section_params(cfg.pretrain.options)},
                "finetune": {"precision": cfg.finetune.precision},
                "privacy": {"pseudonymise": domain.pseudonymises(cfg)}}
    withheld = []
    for name in WITHHELD:
        section, key = name.split(".")
        if sections[section].pop(key, None) is not None:
            withheld.append(name)
    return {"version": SETTINGS_VERSION, "domain": cfg.name, "module": cfg.module, "init": init,
            "block": sections, "withheld": withheld}


def read_settings(folder: Path, root: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The block an export was made with (its ssl_pipeline.json), parsed and validated as a block of
    params.yaml is (`load_config`), with the domain that reads it and the settings as written.
    Relative paths (privacy.salt_file) start at `root`, the receiving project's; a withheld path
    names `folder`."""
    from ssl_models.core.config import parse_block

    file = folder / SETTINGS
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
        block = {"module": settings["module"], "corpus": ".", **settings["block"]}
        name, version = settings["domain"], settings["version"]
        for setting in settings["withheld"]:
            section, key = setting.split(".")
            block[section][key] = str(folder.absolute())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise PipelineError(f"{file}: not the settings `ssl-pipeline export` writes ({type(error).__name__}: "
                            f"{error}); export the encoder again") from None
    if version != SETTINGS_VERSION:
        raise PipelineError(f"{file}: settings version {version!r}, this ssl-pipeline reads version "
                            f"{SETTINGS_VERSION}; export the encoder again with this version")
    try:  # the one parser of a block, load_config's
        cfg, domain = parse_block(name, block, root)
    except PipelineError as error:  # another version's settings
        raise PipelineError(f"{file}: {str(error).removeprefix('params.yaml ')}; export the encoder again "
                            "with this version of ssl-pipeline") from None
    return cfg, domain, settings


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


def model_card(cfg: Any, domain: Any, paths: DomainPaths, init: str, about: dict[str, Any]) -> str:
    """The export's README.md (templates/model_card.md.j2): Hugging Face front matter with the
    verdict's numbers as a model-index where evaluate has run, intended and out-of-scope uses, a
    data statement, the evaluation, limitations, provenance and how to load it."""
    from collections import Counter

    from tasks.stages.report import (
        ENVIRONMENT,
        all_quarantined,
        optional_json,
        task_sentence,
        uses_default_data,
        verdict_table,
        verdicts,
    )

    metrics = optional_json(paths.evaluation / "metrics.json")
    comparisons = read_json(paths.evaluation / "comparisons.json") if metrics else []
    lineage_file = paths.pretrain / RECORD_NAME
    lineage = optional_json(lineage_file) or {}
    pretrain_log = optional_json(paths.pretrain / "log.json") or {}
    ingest = optional_json(paths.manifest / "summary.json")
    quarantine = all_quarantined(paths) if ingest else []
    found = verdicts(metrics, comparisons) if metrics else []
    base = domain.generic_checkpoint(cfg) if init == "generic" else getattr(cfg.model, "base_checkpoint", None)
    # the weights derive from the organisation's own data: no open license is presumed
    front = {"license": "other", "license_name": "organisation-internal", "library_name": about["library"],
             "tags": ["ssl-pipeline", cfg.name, "self-supervised", "feature-extraction"],
             "pipeline_tag": "feature-extraction"}
    if metrics:
        front["model-index"] = [{"name": f"ssl-pipeline-{cfg.name}", "results": [
            {"task": {"type": "feature-extraction"},
             "dataset": {"type": "private", "name": f"{cfg.name} labeled set (test split)"},
             "metrics": [{"type": metrics["primary_metric"], "name": f"{row['init']} {row['protocol']} "
                          f"with {row['label_fraction']:.0%} of labels", "value": row["mean"]}
                         for row in metrics.get("best_protocols", []) if row["init"] in (init, "baseline")]}]}]
    return ENVIRONMENT.get_template("model_card.md.j2").render(
        front_matter=yaml.safe_dump(front, sort_keys=True).rstrip(), domain_name=cfg.name, init=init, about=about,
        finetuned=about.get("finetuned"),
        method=cfg.pretrain.method, backbone=cfg.model.backbone, base=base, manifest=MANIFEST,
        task_kind=domain.task_kind, task=task_sentence(domain, cfg, uses_default_data(cfg, paths)),
        ingest=ingest and {"labeled_by_split": {}, **ingest}, quarantined=len(quarantine),
        quarantine_reasons=Counter(q["reason"] for q in quarantine).most_common(10),
        pseudonymised=domain.pseudonymises(cfg), metrics=metrics,
        primary=metrics and metrics["primary_metric"],
        unit=metrics and metrics.get("comparison_metric", metrics["primary_metric"]),
        confidence=(metrics or {}).get("confidence", 0.95), verdicts=found,
        paid_off_anywhere=any(v["outcome"] == "paid off" for v in found),
        best_protocols=(metrics or {}).get("best_protocols", []),
        table=verdict_table(metrics, comparisons) if metrics else [],
        checkpoints=pretrain_log.get("checkpoints", [])[-12:],
        rankme_rows=pretrain_log.get("rankme_rows", "validation"),
        chosen=pretrain_log.get("choice"), lineage_path=paths.relative(lineage_file),
        lineage_sha=sha256_file(lineage_file) if lineage_file.exists() else "none",
        outputs_digest=lineage.get("outputs_digest", "none"), pretrain_path=paths.relative(paths.pretrain))
