"""default_data: lay out a domain's embedded default corpus and labels from installed packages."""

from __future__ import annotations

import logging

from ssl_models.core.config import load_domain_config
from ssl_models.core.domain import load_domain
from tasks.io import atomic_dir
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths

log = logging.getLogger("default_data")


def default_data(domain_name: str) -> None:
    cfg = load_domain_config(domain_name)
    domain = load_domain(cfg)
    paths = DomainPaths(domain_name)
    recorder = LineageRecorder(f"default_data@{domain_name}", paths.default_data,
                               params={"module": cfg.module, "default_data": cfg.default_data})
    with atomic_dir(paths.default_data) as out:
        domain.write_default_data(out, cfg)
        recorder.write(out)
    log.info("default data for %s written to %s", domain_name, paths.default_data)
