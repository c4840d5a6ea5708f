"""preprocess: turn the manifest's records into a few large Arrow shards, deterministically.

The domain writes `pretrain_train`, `pretrain_val` (unlabeled, for SSL and RankMe) and
`labeled` (every labeled record with its split and group). Pretraining uses the train split
only, so labeled test samples are never pretrained on; the summary counts any exact copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ssl_models.core.config import DomainConfig, made_by, section_params
from ssl_models.core.domain import Domain, Source
from ssl_models.core.errors import PipelineError
from ssl_models.core.shards import LABELED
from tasks.io import JsonlRows, atomic_dir, read_json, write_json, write_jsonl
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from ssl_models.core.workers import running_on
from tasks.sources import Discovery, discover_stream, public_namer
from tasks.workers import chunked_work

log = logging.getLogger("preprocess")


def preprocess(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    domain_name = cfg.name
    manifest = _read_manifest(paths, domain_name)
    recorder = LineageRecorder(f"preprocess@{domain_name}", paths.shards, root=paths.root,
                               params={"corpus": str(cfg.corpus), "privacy": asdict(cfg.privacy),
                                       "preprocess": made_by(cfg.preprocess),
                                       "model": section_params(cfg.model)},
                               upstream=[paths.manifest])
    # the labeled test rows (a few), then which of their contents the train split holds too: the
    # train split's content hashes are looked up as they stream by, not kept (a million of them)
    test_labeled = [row for row in manifest if row.get("label") is not None and row["split"] == "test"]
    wanted = {row["sha256"] for row in test_labeled}
    pretrained_on = {row["sha256"] for row in manifest if row["split"] == "train" and row["sha256"] in wanted} \
        if wanted else set()
    public = public_namer(domain, cfg, create_salt=False)
    locate = SourcesInOrder(lambda: discover_stream(domain, cfg, public, Discovery()),
                            f"a source of the manifest is no longer in {cfg.corpus} (or the salt changed); "
                            f"re-run ingest@{domain_name}")

    work = chunked_work(cfg, paths, "preprocess", {"domain": cfg.name, "preprocess": made_by(cfg.preprocess),
                                                   "ingest": made_by(cfg.ingest), "model": section_params(cfg.model)},
                        max_items=domain.preprocess_chunk_items)
    with atomic_dir(paths.shards) as out, running_on(work):
        summary = domain.preprocess(cfg, manifest, out, locate)
        # what failed here (a slide that does not tile, a file changed since ingest), with its reason;
        # the report lists it beside the manifest's quarantine.jsonl
        quarantine = summary.pop("quarantine", [])
        summary["quarantined"] = len(quarantine)
        summary.setdefault("labeled_test", len(test_labeled))  # a tiling domain counts its test tiles
        summary["labeled_test_exact_copies_in_pretraining"] = sum(r["sha256"] in pretrained_on for r in test_labeled)
        problem = _preprocess_problem(cfg, manifest, quarantine, out)
        if problem:
            summary["stopped"] = problem
        write_jsonl(out / "quarantine.jsonl", quarantine)
        write_json(out / "summary.json", summary)
        recorder.write(out)
    work.finish()
    log.info("preprocess %s: %s", domain_name, summary)
    if problem:
        raise PipelineError(problem)
    return summary


class SourcesInOrder:
    """`locate(row)`: the Source of a manifest row, found by walking the corpus alongside the
    manifest. Ingest wrote the rows in the walk's order, so a domain asking for them in the
    manifest's order is answered from a single walk that drops each source it passes: one source
    is held, not the corpus (about 0.6 KB a file as a dict). A row asked out of that order has
    the corpus walked again, once, and every source kept from then on."""

    def __init__(self, walk: Callable[[], Iterator[tuple[str, str, Any]]], missing: str) -> None:
        self.walk, self.missing = walk, missing
        self.stream = self._sources(walk())
        self.current: tuple[str, Source] | None = None
        self.every: dict[str, Source] | None = None  # once a row came out of order

    @staticmethod
    def _sources(stream: Iterator[tuple[str, str, Any]]) -> Iterator[tuple[str, Source]]:
        return ((key, value) for kind, key, value in stream if kind == "source")

    def __call__(self, row: dict[str, Any]) -> Source:
        key = row["source"]
        if self.every is None:
            if self.current is not None and self.current[0] == key:
                return self.current[1]
            for self.current in self.stream:
                if self.current[0] == key:
                    return self.current[1]
            self.every = dict(self._sources(self.walk()))
        if key not in self.every:
            raise PipelineError(self.missing)
        return self.every[key]


def _read_manifest(paths: DomainPaths, domain_name: str) -> JsonlRows:
    """The manifest, if ingest finished and passed its checks; else one line saying what to run."""
    folder = paths.manifest
    shown = folder.relative_to(paths.root).as_posix() if folder.is_relative_to(paths.root) else str(folder)
    if not (folder / "manifest.jsonl").is_file() or not (folder / "summary.json").is_file():
        raise PipelineError(f"no manifest in {shown}: run ingest@{domain_name} first "
                            f"(`ssl-pipeline ingest {domain_name}` or `dvc repro`)")
    stopped = read_json(folder / "summary.json").get("stopped")
    if stopped:
        raise PipelineError(f"ingest@{domain_name} stopped on a problem to fix first: {stopped}")
    return JsonlRows(folder / "manifest.jsonl")


def _preprocess_problem(cfg: DomainConfig, manifest: Sequence[dict[str, Any]], quarantine: list[dict[str, str]],
                        out: Path) -> str | None:
    """Stop when preprocess quarantined too much (every source, or more than the ingest share), or
    when a class of the labeled rows has none in the train split (a domain that splits labeled
    rows here, by spatial block, can only be checked here)."""
    where, limit = f"preprocess@{cfg.name}", cfg.ingest.max_quarantined_fraction
    if manifest and len(quarantine) / len(manifest) > limit:
        return (f"{where}: {len(quarantine)} of {len(manifest)} sources quarantined in preprocess (above "
                f"ingest.max_quarantined_fraction {limit:.0%}; first: {quarantine[0]['reason']!r}); see the shards' "
                "quarantine.jsonl")
    labeled = _labeled_columns(out / LABELED)
    if labeled is None:
        return None
    with_train = {label for label, split in labeled if split == "train"}
    lacking = sorted({label for label, _ in labeled} - with_train)
    if lacking:
        return (f"{where}: {len(lacking)} class(es) have no labeled row in the train split after preprocess: "
                f"{', '.join(repr(c) for c in lacking[:3])}; label more examples of them (more slides, groups or "
                "spatial blocks), or drop them from the labels")
    return None


def _labeled_columns(folder: Path) -> list[tuple[str, str]] | None:
    """(label, split) of each row of the `labeled` shard, or None when the domain wrote none."""
    if not any(folder.glob("*.arrow")):
        return None
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    if not {"label", "split"} <= set(dataset.column_names):
        return None
    return list(zip(dataset["label"], dataset["split"]))
