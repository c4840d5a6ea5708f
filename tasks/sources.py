"""Find a corpus' sources the same way in every stage, and name them in public.

Ingest and preprocess both call `discover`, so preprocess can find the raw files of a
manifest row from its public source key, even when that key is a salted pseudonym.

The corpus folder is a boundary: a symlink whose target lies outside it (a file, or a folder)
is not followed unless `ingest.follow_symlinks` is true; it is set aside with its reason, as a
broken link, a link loop or a pipe is. A link whose target lies inside the corpus reads as the
file it names; a link to a folder inside the corpus is not walked again (its files are read
under their own names).
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain, Rejected, Source, relative_key
from ssl_models.core.errors import PipelineError
from ssl_models.core.privacy import new_salt, pseudonymiser
from tasks.io import read_json
from tasks.paths import DomainPaths, relative_to

Namer = Callable[[str, str], str]  # (kind, private value) -> what may be written

LEAVES_CORPUS = "symlink leaving the corpus (not followed: set ingest.follow_symlinks: true to read it)"
BROKEN_LINK = "broken symlink (its target does not exist)"
LINK_LOOP = "symlink loop (not followed)"
FOLDER_READ_ALREADY = "symlink to a folder read already under another name (not followed again)"
NOT_A_FILE = "not a regular file (a pipe, socket or device: not read)"


def public_namer(domain: Domain, cfg: DomainConfig, create_salt: bool = True) -> Namer:
    """Identity, or the salted pseudonym when the domain pseudonymises (`kind` in key, group).
    A missing salt is made anew only while no output was pseudonymised with it (`make_new_salt`
    does it on purpose)."""
    if not domain.pseudonymises(cfg):
        return lambda kind, value: value
    salt_file = cfg.resolve(cfg.privacy.salt_file)
    if not salt_file.exists():
        salted = outputs_salted_with(salt_file, cfg.root)
        if salted:
            shown = ", ".join(salted[:3]) + (f" and {len(salted) - 3} more" if len(salted) > 3 else "")
            raise PipelineError(
                f"salt file {cfg.privacy.salt_file} is missing, but {shown} {'was' if len(salted) == 1 else 'were'} "
                "pseudonymised with it: a new salt "
                "changes every pseudonym (each key and group) of those outputs, so every stage from ingest on "
                "re-runs and keys recorded elsewhere stop matching; put the salt file back from a backup, or make "
                f"a new one on purpose with `ssl-pipeline ingest {cfg.name} --new-salt`")
    return pseudonymiser(salt_file, create=create_salt)


def outputs_salted_with(salt_file: Path, root: Path) -> list[str]:
    """The manifests under `root` (`data/<domain>/manifest`) whose lineage record says they were
    pseudonymised with `salt_file`: the outputs a new salt would orphan."""
    salted = []
    for folder in sorted((root / "data").glob("*/")):
        manifest = DomainPaths(folder.name, root).manifest
        try:
            params = read_json(manifest / "lineage.json")["params"]
            privacy = params.get("privacy") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no manifest, or one without a readable record: nothing known to be salted
        written = privacy.get("salt_file")
        if privacy.get("pseudonymised") and written and _same_file(Path(written), root, salt_file):
            salted.append(relative_to(manifest, root))
    return salted


def _same_file(written: Path, root: Path, salt_file: Path) -> bool:
    path = written if written.is_absolute() else root / written
    return os.path.abspath(path) == os.path.abspath(salt_file)


def make_new_salt(cfg: DomainConfig, domain: Domain) -> str:
    """Make the domain's salt anew, on purpose (`ssl-pipeline ingest DOMAIN --new-salt`); refused
    where a salt exists. Returns the line that says what changes, for the log."""
    if not domain.pseudonymises(cfg):
        raise PipelineError(f"domains.{cfg.name} does not pseudonymise (privacy.pseudonymise): it uses no salt")
    salt_file = cfg.resolve(cfg.privacy.salt_file)
    salted = outputs_salted_with(salt_file, cfg.root)
    new_salt(salt_file)
    changed = (f"; {', '.join(salted)} and everything made from it will be rebuilt under new pseudonyms"
               if salted else "")
    return f"made a new salt in {cfg.privacy.salt_file}: every pseudonym of the domains using it changes{changed}"


@dataclass
class CorpusListing:
    """What a walk of the corpus found: the files to read, what it set aside (relative path,
    reason), and the symlinks leaving the corpus it followed (with the files read through them)."""

    files: list[Path] = field(default_factory=list)
    set_aside: list[tuple[str, str]] = field(default_factory=list)
    links_followed: int = 0
    files_through_links: int = 0


def corpus_files(corpus: Path, labels: Path | None, follow_symlinks: bool = False) -> CorpusListing:
    """Every file below `corpus` (the labels file excluded), sorted; symlinks kept to the corpus
    unless `follow_symlinks` (see the module's docstring). Never loops: a folder is walked once."""
    listing = CorpusListing()
    listing.files = list(walk_corpus(corpus, labels, listing, follow_symlinks))
    return listing


def walk_corpus(corpus: Path, labels: Path | None, listing: CorpusListing,
                follow_symlinks: bool = False) -> Iterator[Path]:
    """`corpus_files` as a stream: the files one at a time, in the same order (each folder's entries
    sorted by name and walked depth first is the order of the paths' parts), holding one folder's
    entries per level of the walk and never the whole corpus. What it sets aside and the links it
    followed go into `listing` (its `set_aside` sorted once the walk is over)."""
    labels_file = os.path.realpath(labels) if labels else None  # may sit inside the corpus folder
    labels_name = Path(labels_file).name if labels_file else None
    boundary = os.path.realpath(corpus)
    walked: set[str] = set()  # real paths of the folders walked

    def set_aside(path: Path, reason: str) -> None:
        listing.set_aside.append((relative_key(path, corpus), reason))

    def walk(folder: Path, through_link: bool) -> Iterator[Path]:
        walked.add(os.path.realpath(folder))
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            path, leaves = folder / entry.name, False
            if entry.is_symlink():
                try:
                    os.stat(path)
                except OSError as error:
                    set_aside(path, LINK_LOOP if error.errno == errno.ELOOP else BROKEN_LINK)
                    continue
                target = os.path.realpath(path)
                leaves = not _below(target, {boundary})
                if leaves and not follow_symlinks:
                    set_aside(path, LEAVES_CORPUS)
                    continue
                if entry.is_dir() and not leaves:
                    continue  # a folder of the corpus: walked under its own name
            if entry.is_dir():
                if through_link or leaves:  # outside the corpus a folder may be reached twice, or from below
                    target = os.path.realpath(path)
                    if target in {os.path.realpath(parent) for parent in path.parents}:
                        set_aside(path, LINK_LOOP)
                        continue
                    if target in walked or (leaves and _below(target, walked)):  # a link into one walked
                        set_aside(path, FOLDER_READ_ALREADY)
                        continue
                listing.links_followed += leaves
                yield from walk(path, through_link or leaves)
            elif entry.is_file():
                listing.links_followed += leaves
                # only a link, or a file of the same name, can be the labels file: no realpath per file
                named_so = entry.name == labels_name or entry.is_symlink() or through_link
                if not (named_so and os.path.realpath(path) == labels_file):
                    listing.files_through_links += through_link or leaves
                    yield path
            else:
                set_aside(path, NOT_A_FILE)

    yield from walk(corpus, through_link=False)
    listing.set_aside.sort()


def _below(target: str, folders: set[str]) -> bool:
    """Whether the real path `target` is one of `folders` or lies below one of them."""
    return any(target == folder or target.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)


@dataclass
class Discovery:
    sources: dict[str, Source] = field(default_factory=dict)  # public source key -> source
    files: list[tuple[str, Path]] = field(default_factory=list)  # (public file key, path), hidden ones excluded
    unsupported: list[str] = field(default_factory=list)  # public keys of files the domain does not read
    rejected: list[dict[str, str]] = field(default_factory=list)  # sources the domain refused, with reasons
    set_aside: list[dict[str, str]] = field(default_factory=list)  # links not followed, pipes, with reasons
    hidden: int = 0
    links_followed: int = 0  # symlinks leaving the corpus that were followed (ingest.follow_symlinks)
    files_through_links: int = 0

    def quarantined(self, domain: Domain) -> list[dict[str, str]]:
        """The quarantine entries of what discovery set aside: links it did not follow, files of a
        type the domain does not read, then sources it refused."""
        reads = unsupported_reason(domain)
        return self.set_aside + [{"key": key, "reason": reads} for key in self.unsupported] + self.rejected


def unsupported_reason(domain: Domain) -> str:
    """The quarantine reason of a file of a type `domain` does not read."""
    return f"unsupported file type; {domain.name} reads {', '.join(domain.suffixes)}"


def is_hidden(relative: str) -> bool:
    """A corpus-relative POSIX key with a part starting with a dot (a string test: a Path per file
    costs seconds over a million files)."""
    return relative.startswith(".") or "/." in relative


def discover(domain: Domain, cfg: DomainConfig, public: Namer) -> Discovery:
    """Every non-hidden file of the corpus, and the sources the domain groups them into."""
    found = Discovery()
    for kind, key, value in discover_stream(domain, cfg, public, found):
        if kind == "listed":
            found.files.append((key, value))
        elif kind == "unsupported":
            found.unsupported.append(key)
        elif kind == "source":
            found.sources[key] = value
        elif kind == "rejected":
            found.rejected.append(value)
    return found


def discover_stream(domain: Domain, cfg: DomainConfig, public: Namer,
                    found: Discovery) -> Iterator[tuple[str, str, Any]]:
    """`discover` as a stream of (kind, public key, value), for a corpus too large to hold:
    `listed` (every non-hidden file, with its path), `unsupported` (a file of a type the domain
    does not read, with its path), `source` (with the Source), `rejected` (a source the domain
    refused: the quarantine entry) and `unread` (an accepted file no source reads, with its path).
    A domain that groups files into sources one file at a time (`Domain.streams_sources`) is
    given the files as the walk finds them; one grouping across the corpus (DICOM series) is
    given the accepted files as a list once the walk is over. `found` takes the counts and what
    the walk set aside (complete once the stream is)."""
    corpus = cfg.resolve(cfg.corpus)
    listing = CorpusListing()
    walk = walk_corpus(corpus, cfg.resolve(cfg.labels) if cfg.labels else None, listing,
                       follow_symlinks=bool(getattr(cfg.ingest, "follow_symlinks", False)))
    events: deque[tuple[str, str, Any]] = deque()  # what the walk met before the next source

    def accepted() -> Iterator[Path]:
        for path in walk:
            relative = relative_key(path, corpus)
            if is_hidden(relative):
                found.hidden += 1
                continue
            key = public("key", relative)
            events.append(("listed", key, path))
            if domain.accepts(path):
                yield path
            else:
                events.append(("unsupported", key, path))

    def sources(files: Iterable[Path]) -> Iterator[tuple[str, str, Any]]:
        for item in domain.sources(files, corpus, cfg):
            yield from _drain(events)
            if isinstance(item, Rejected):
                yield "rejected", item.key, {"key": public("key", item.key), "reason": item.reason}
            else:
                yield "source", public("key", item.key), item

    if domain.streams_sources:
        yield from sources(accepted())
        yield from _drain(events)
    else:
        files = list(accepted())
        yield from _drain(events)
        in_sources: set[Path] = set()
        for kind, key, value in sources(files):
            if kind == "source":
                in_sources.update(value.paths)
            yield kind, key, value
        for path in files:
            if path not in in_sources:
                yield "unread", public("key", relative_key(path, corpus)), path
    found.links_followed, found.files_through_links = listing.links_followed, listing.files_through_links
    for relative, reason in listing.set_aside:
        if is_hidden(relative):
            found.hidden += 1
        else:
            found.set_aside.append({"key": public("key", relative), "reason": reason})


def _drain(events: deque) -> Iterator[Any]:
    while events:
        yield events.popleft()
