"""export: the pretrained encoder in its field's own format, with a model card and a manifest
(`models/<domain>/export/`; tasks/export.py writes it, `ssl-pipeline export` with options writes
other inits or elsewhere). Runs after evaluate, so the card carries the verdict's numbers."""

from __future__ import annotations

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain
from tasks.export import write_export
from tasks.paths import DomainPaths


def export(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> str:
    return str(write_export(cfg, domain, paths, "ssl", paths.export))
