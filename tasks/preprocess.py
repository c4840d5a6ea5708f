"""preprocess: turn the manifest's records into a few large Arrow shards, deterministically.

The domain writes `pretrain_train`, `pretrain_val` (unlabeled, for SSL and RankMe) and
`labeled` (every labeled record with its split and group). Pretraining uses the train split
only, so labeled test samples are never pretrained on; the summary counts any exact copies.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.domain import Domain, Source
from ssl_models.core.errors import PipelineError
from tasks.io import atomic_dir, read_jsonl, write_json
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.sources import discover, public_namer

log = logging.getLogger("preprocess")


def preprocess(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    domain_name = cfg.name
    manifest = read_jsonl(paths.manifest / "manifest.jsonl")
    recorder = LineageRecorder(f"preprocess@{domain_name}", paths.shards, root=paths.root,
                               params={"corpus": str(cfg.corpus), "privacy": asdict(cfg.privacy),
                                       "preprocess": section_params(cfg.preprocess),
                                       "model": section_params(cfg.model)},
                               upstream=[paths.manifest])
    pretrained_on = {row["sha256"] for row in manifest if row["split"] == "train"}
    test_labeled = [row for row in manifest if row.get("label") is not None and row["split"] == "test"]
    sources = discover(domain, cfg, public_namer(domain, cfg, create_salt=False)).sources

    def locate(row: dict[str, Any]) -> Source:
        if row["source"] not in sources:
            raise PipelineError(f"a source of the manifest is no longer in {cfg.corpus} (or the salt changed); "
                                f"re-run ingest@{domain_name}")
        return sources[row["source"]]

    with atomic_dir(paths.shards) as out:
        summary = domain.preprocess(cfg, manifest, out, locate)
        summary.setdefault("labeled_test", len(test_labeled))  # a tiling domain counts its test tiles
        summary["labeled_test_exact_copies_in_pretraining"] = sum(r["sha256"] in pretrained_on for r in test_labeled)
        write_json(out / "summary.json", summary)
        recorder.write(out)
    log.info("preprocess %s: %s", domain_name, summary)
    return summary
