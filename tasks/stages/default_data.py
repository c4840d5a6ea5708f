"""default_data: lay out a domain's embedded default corpus and labels from installed packages."""

from __future__ import annotations

import logging

from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.domain import Domain
from tasks.io import atomic_dir
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths

log = logging.getLogger("default_data")


def default_data(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> None:
    recorder = LineageRecorder(f"default_data@{cfg.name}", paths.default_data, root=paths.root,
                               params={"module": cfg.module, "default_data": section_params(cfg.default_data)})
    with atomic_dir(paths.default_data) as out:
        written = domain.write_default_data(out, cfg)
        recorder.write(out)
    log.info("default data for %s written to %s: %s", cfg.name, paths.default_data, written)
