"""ingest: walk the corpus, read every source with the domain's reader, write the manifest.

One row per usable record (content hash, bytes, domain metadata, split, label, group); when
the domain pseudonymises, keys and groups are salted hashes and no file name is written;
unreadable files and records go to the quarantine list with their reason; exact duplicates
are dropped and counted. Splits come from a hash of the group (or of the content), so adding
files never moves old ones between splits.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.domain import Domain, Record, Rejected, Source
from ssl_models.core.errors import PipelineError, UnreadableFileError
from ssl_models.core.hashing import sha256_file
from ssl_models.core.privacy import without_names
from ssl_models.core.splits import assign_split
from tasks.io import atomic_dir, write_json, write_jsonl
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.sources import Namer, discover, public_namer

log = logging.getLogger("ingest")


def normalise_label_path(value: str, corpus: Path) -> str:
    """`./a/b.txt`, `a\\b.txt` and an absolute path inside the corpus all name `a/b.txt`."""
    key = value.strip().replace("\\", "/")
    path = Path(key)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(corpus.resolve()).as_posix()
        except ValueError:
            return key
    return path.as_posix()


def read_labels(path: Path | None, corpus: Path) -> dict[str, dict[str, str | None]]:
    """labels CSV -> {path relative to the corpus: {"label", "group"}}; columns `path,label` and
    an optional `group`. A record inside a .jsonl file is `file.jsonl#L<line>`."""
    if path is None:
        return {}
    if not path.is_file():
        raise PipelineError(f"labels file {path} not found; set `labels:` in params.yaml or remove it")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip() for c in reader.fieldnames or []}
        if not {"path", "label"} <= columns:
            raise PipelineError(f"{path}: needs columns path,label (and optionally group); found {sorted(columns)}")
        labels = {}
        for row in reader:
            row = {k.strip(): v for k, v in row.items() if k}
            if row.get("path") and row.get("label") not in (None, ""):
                labels[normalise_label_path(row["path"], corpus)] = {
                    "label": row["label"].strip(), "group": (row.get("group") or "").strip() or None}
    return labels


def _read_source(domain: Domain, source: Source, cfg: DomainConfig) -> tuple[list[Record], list[dict]]:
    records, rejected = [], []
    try:
        for item in domain.read(source, cfg):
            if isinstance(item, Rejected):
                rejected.append({"key": item.key, "reason": item.reason})
            else:
                item.content = None  # the manifest keeps hashes and metadata, not content
                records.append(item)
    except UnreadableFileError as error:
        return [], [{"key": source.key, "reason": error.reason}]
    except Exception as error:  # a reader bug or an exotic file must not stop the run
        return [], [{"key": source.key, "reason": f"reader failed: {type(error).__name__}: "
                     f"{without_names(str(error), source.paths)}"}]
    return records, rejected


def ingest(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    """Run the ingest stage for one domain; returns its summary."""
    domain_name = cfg.name
    corpus = cfg.resolve(cfg.corpus)
    if not corpus.is_dir():
        raise PipelineError(f"corpus folder {cfg.corpus} not found; set domains.{domain_name}.corpus in params.yaml")
    public = public_namer(domain, cfg)
    labels_file = cfg.resolve(cfg.labels) if cfg.labels else None
    labels = {public("key", key): value for key, value in read_labels(labels_file, corpus).items()}
    recorder = LineageRecorder(f"ingest@{domain_name}", paths.manifest, root=paths.root,
                               params={"module": cfg.module, "corpus": str(cfg.corpus),
                                       "labels": str(cfg.labels) if cfg.labels else None,
                                       "split": asdict(cfg.split), "ingest": section_params(cfg.ingest),
                                       "privacy": {**asdict(cfg.privacy),
                                                   "pseudonymised": domain.pseudonymises(cfg)}})
    found = discover(domain, cfg, public)
    # a label may name any file of a multi-file source (one slice of a DICOM series): it labels the source
    member_of = {public("key", path.relative_to(corpus).as_posix()): key
                 for key, source in found.sources.items() if len(source.paths) > 1 for path in source.paths}
    labels = {member_of.get(key, key): value for key, value in labels.items()}
    quarantine: list[dict[str, str]] = [
        {"key": key, "reason": f"unsupported file type; {domain.name} reads {', '.join(domain.suffixes)}"}
        for key in found.unsupported] + found.rejected
    rows: list[dict[str, Any]] = []
    duplicates: list[dict[str, str]] = []
    canonical: dict[str, str] = {}  # content hash -> first key with it
    alias: dict[str, str] = {}  # duplicate key -> kept key
    raw_inputs = {key: sha256_file(path) for key, path in found.files}
    reader_groups: dict[str, str] = {}  # key -> the group a reader found (a patient), private
    for source_key, source in tqdm(found.sources.items(), desc=f"ingest {domain_name}", unit="source", disable=None):
        records, rejected = _read_source(domain, source, cfg)
        quarantine.extend({"key": public("key", item["key"]), "reason": item["reason"]} for item in rejected)
        for record in records:
            key = public("key", record.key)
            if record.sha256 in canonical:
                alias[key] = canonical[record.sha256]
                duplicates.append({"key": key, "duplicate_of": canonical[record.sha256]})
                continue
            canonical[record.sha256] = key
            if record.group:
                reader_groups[key] = record.group
            rows.append({"key": key, "source": source_key, "sha256": record.sha256,
                         "bytes": record.n_bytes, **record.meta})
    summary = _attach_labels_and_splits(rows, labels, reader_groups, alias, quarantine, cfg, public)
    summary.update(files=len(found.files) + found.hidden, sources=len(found.sources),
                   hidden_files_skipped=found.hidden, records=len(rows),
                   quarantined=len(quarantine), duplicates_dropped=len(duplicates),
                   pseudonymised=domain.pseudonymises(cfg))
    with atomic_dir(paths.manifest) as out:
        write_jsonl(out / "manifest.jsonl", rows)
        write_jsonl(out / "quarantine.jsonl", quarantine)
        write_jsonl(out / "duplicates.jsonl", duplicates)
        write_json(out / "summary.json", summary)
        recorder.raw_inputs = raw_inputs
        recorder.write(out)
    log.info("ingest %s: %d records, %d quarantined, %d duplicates dropped, %d labeled",
             domain_name, len(rows), len(quarantine), len(duplicates), summary["labeled"])
    return summary


def _attach_labels_and_splits(rows: list[dict[str, Any]], labels: dict[str, dict[str, str | None]],
                              reader_groups: dict[str, str], alias: dict[str, str],
                              quarantine: list[dict[str, str]], cfg: DomainConfig, public: Namer) -> dict[str, Any]:
    """Label each row, give it its group (the labels CSV's, else the reader's) and its split.
    The split hashes the private group with the public split salt, so it does not depend on the
    pseudonym salt: the same data splits the same way on every machine."""
    groups = dict(reader_groups)
    by_key = {row["key"]: row for row in rows}
    quarantined = {q["key"] for q in quarantine}
    missing, on_quarantined, conflicting = [], 0, 0
    for key, value in labels.items():
        row = by_key.get(alias.get(key, key))
        if row is None:
            if key in quarantined:
                on_quarantined += 1
            else:
                missing.append(key)
            continue
        if row.get("label") is not None and row["label"] != value["label"]:
            conflicting += 1  # two identical files labeled differently: the first label stays
            continue
        row["label"] = value["label"]
        if value["group"]:
            groups[row["key"]] = value["group"]
    for row in rows:
        row.setdefault("label", None)
        group = groups.get(row["key"])
        row["group"] = public("group", group) if group else None
        row["split"] = assign_split(group or row["sha256"], cfg.split.val, cfg.split.test, cfg.split.salt)
    labeled = [r for r in rows if r["label"] is not None]
    return {"labeled": len(labeled),
            "labeled_by_split": {s: sum(r["split"] == s for r in labeled) for s in ("train", "val", "test")},
            "records_by_split": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")},
            "labels_without_file": len(missing), "labels_without_file_examples": missing[:10],
            "labels_on_quarantined_files": on_quarantined, "labels_conflicting_on_duplicates": conflicting}
