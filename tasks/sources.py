"""Find a corpus' sources the same way in every stage, and name them in public.

Ingest and preprocess both call `discover`, so preprocess can find the raw files of a
manifest row from its public source key, even when that key is a salted pseudonym.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain, Rejected, Source
from ssl_models.core.privacy import pseudonymiser

Namer = Callable[[str, str], str]  # (kind, private value) -> what may be written


def public_namer(domain: Domain, cfg: DomainConfig, create_salt: bool = True) -> Namer:
    """Identity, or the salted pseudonym when the domain pseudonymises (`kind` in key, group)."""
    if not domain.pseudonymises(cfg):
        return lambda kind, value: value
    return pseudonymiser(cfg.resolve(cfg.privacy.salt_file), create=create_salt)


@dataclass
class Discovery:
    sources: dict[str, Source] = field(default_factory=dict)  # public source key -> source
    files: list[tuple[str, Path]] = field(default_factory=list)  # (public file key, path), hidden ones excluded
    unsupported: list[str] = field(default_factory=list)  # public keys of files the domain does not read
    rejected: list[dict[str, str]] = field(default_factory=list)  # sources the domain refused, with reasons
    hidden: int = 0

    def quarantined(self, domain: Domain) -> list[dict[str, str]]:
        """The quarantine entries of what discovery set aside: files of a type the domain does not
        read, then sources it refused."""
        reads = f"unsupported file type; {domain.name} reads {', '.join(domain.suffixes)}"
        return [{"key": key, "reason": reads} for key in self.unsupported] + self.rejected


def corpus_files(corpus: Path, labels: Path | None) -> list[Path]:
    labels_file = labels.resolve() if labels else None  # may sit inside the corpus folder
    return sorted(p for p in corpus.rglob("*") if p.is_file() and p.resolve() != labels_file)


def discover(domain: Domain, cfg: DomainConfig, public: Namer) -> Discovery:
    """Every non-hidden file of the corpus, and the sources the domain groups them into."""
    found = Discovery()
    accepted = []
    corpus = cfg.resolve(cfg.corpus)
    for path in corpus_files(corpus, cfg.resolve(cfg.labels) if cfg.labels else None):
        relative = path.relative_to(corpus).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):
            found.hidden += 1
            continue
        found.files.append((public("key", relative), path))
        if domain.accepts(path):
            accepted.append(path)
        else:
            found.unsupported.append(public("key", relative))
    for item in domain.sources(accepted, corpus, cfg):
        if isinstance(item, Rejected):
            found.rejected.append({"key": public("key", item.key), "reason": item.reason})
        else:
            found.sources[public("key", item.key)] = item
    return found
