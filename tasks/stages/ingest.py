"""ingest: walk the corpus, read every source with the domain's reader, write the manifest.

One row per usable record (content hash, bytes, domain metadata, split, label, group); when
the domain pseudonymises, keys and groups are salted hashes and no file name is written;
unreadable files and records go to the quarantine list with their reason; exact duplicates
are dropped and counted. Splits come from a hash of the group (or of the content), so adding
files never moves old ones between splits.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ssl_models.core.config import DomainConfig, made_by
from ssl_models.core.domain import Domain, Record, Rejected, Source, get_domain
from ssl_models.core.errors import PipelineError, UnreadableFileError
from ssl_models.core.hashing import StampedRead, remember_digest, stamped_read, taken_by_ingest
from ssl_models.core.privacy import without_names
from ssl_models.core.splits import assign_split
from ssl_models.core.workers import file_stamp, run_items, running_on
from tasks.content_index import ContentIndex
from tasks.io import atomic_dir, iter_jsonl, private_outputs, write_json, write_jsonl, write_lines
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.sources import (Discovery, Namer, corpus_files, discover_stream, is_hidden, public_namer, relative_key,
                           unsupported_reason)
from tasks.workers import chunked_work

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


def read_labels(path: Path | None, corpus: Path, show_paths: bool = True) -> dict[str, dict[str, Any]]:
    """labels CSV -> {path relative to the corpus: {"label", "group", "line"}}; columns `path,label`
    and an optional `group`. A record inside a .jsonl file is `file.jsonl#L<line>`. A file listed
    twice with another label (or group) is refused, naming both lines (and the path when
    `show_paths`: not where the domain pseudonymises); listed twice alike, it is kept once. A CSV of
    its header alone is an unlabeled corpus (what `labels: null` says, in a form DVC can take as a
    dependency); rows of which none has both a path and a label are refused."""
    if path is None:
        return {}
    if not path.is_file():
        raise PipelineError(f"labels file {path} not found; set `labels:` in params.yaml or remove it")
    labels: dict[str, dict[str, Any]] = {}
    repeated: list[int] = []  # lines that repeat an earlier row
    rows_seen = 0
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = {c.strip() for c in reader.fieldnames or []}
            if not {"path", "label"} <= columns:
                raise PipelineError(f"{path}: needs columns path,label (and optionally group); "
                                    f"found {sorted(columns)}")
            for row in reader:
                rows_seen += 1
                row = {k.strip(): v for k, v in row.items() if isinstance(k, str)}
                if row.get("path") and row.get("label") not in (None, ""):
                    key = normalise_label_path(row["path"], corpus)
                    value = {"label": row["label"].strip(), "group": (row.get("group") or "").strip() or None,
                             "line": reader.line_num}
                    if key in labels:
                        _check_same_label(path, key, labels[key], value, show_paths)
                        repeated.append(value["line"])
                        continue
                    labels[key] = value
        except UnicodeDecodeError as error:
            raise PipelineError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                                f"{error.start}); save the labels CSV as UTF-8 (a spreadsheet's "
                                "\"CSV UTF-8\" export)") from None
        except csv.Error as error:
            raise PipelineError(f"{path}: line {reader.line_num} is not CSV ({error}); "
                                "write it as comma-separated path,label[,group] rows") from None
    if rows_seen and not labels:
        raise PipelineError(f"{path}: no row with both a path and a label; fill in the labels CSV, or leave its "
                            "header line alone (`path,label`) to ingest the corpus without labels")
    if not rows_seen:
        log.info("%s: a header and no rows: the corpus is ingested without labels", path)
    if repeated:
        log.info("%s: %d row(s) repeat a file listed above with the same label, kept once (line(s) %s)", path,
                 len(repeated), ", ".join(map(str, repeated[:10])) + (", ..." if len(repeated) > 10 else ""))
    return labels


def _check_same_label(path: Path, key: str, first: dict[str, Any], second: dict[str, Any],
                      show_paths: bool) -> None:
    """Two rows of the labels CSV for one file (or one source) must agree: which would win is a guess."""
    for what in ("label", "group"):
        if first[what] != second[what]:
            which = f" ({key!r})" if show_paths else ""
            values = (f"{first[what]!r} on line {first['line']}, {second[what]!r} on line {second['line']}"
                      if what == "label" or show_paths else f"lines {first['line']} and {second['line']}")
            raise PipelineError(f"{path}: lines {first['line']} and {second['line']} give the same file{which} "
                                f"different {what}s ({values}); keep one row per file")


def read_source(domain: Domain, source: Source, cfg: DomainConfig) -> tuple[list[Record], list[dict]]:
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


def _files_of(item: tuple[str, Any]) -> list[Path]:
    kind, value = item
    return value.paths if kind == "source" else [value]


def _identity(item: tuple[str, Any], corpus: Path) -> list[str]:
    """An ingest item's identity: its files' corpus-relative paths (no `stat` here: what each file
    was when read is in the chunk's results, which `_unchanged` checks when a re-run reads them back)."""
    return [relative_key(path, corpus) for path in _files_of(item)]


def _unchanged(items: list[tuple[str, Any]], results: list[dict[str, Any]]) -> bool:
    """Whether the files of a chunk an earlier run read are still of the size and modification time
    its worker saw before reading them (a file edited between a killed run and its re-run is read again)."""
    return len(items) == len(results) and all(
        [list(file_stamp(path)) for path in _files_of(item)] == [list(seen) for seen in entry["seen"]]
        for item, entry in zip(items, results))


def ingest_chunk(job: tuple[DomainConfig, list[tuple[str, Any]]]) -> list[dict[str, Any]]:
    """One chunk of ingest, in any process: each source read by the domain's reader and its files
    hashed, each file no source reads hashed. Plain JSON-ready values (see tasks/workers.py)."""
    cfg, chunk = job
    domain = get_domain(cfg.module)
    corpus = cfg.resolve(cfg.corpus)
    done = []
    for kind, item in chunk:
        files = _files_of((kind, item))
        hashed = [_hash_or_none(path, domain.reads_taken_bytes if kind == "source" else 0) for path in files]
        entry: dict[str, Any] = {"files": [relative_key(path, corpus) for path in files],
                                 "hashes": [read.digest for read in hashed],
                                 "stamps": [read.stamp for read in hashed],
                                 "seen": [read.seen for read in hashed], "source": None}
        if kind == "source":
            taken = {os.fspath(path): (read.digest, read.data) for path, read in zip(files, hashed) if read.digest}
            with taken_by_ingest(taken):
                records, rejected = read_source(domain, item, cfg)  # a reader hashing a file reads it once
            entry.update(source=item.key, rejected=rejected,
                         records=[[r.key, r.sha256, r.group, *_unlabeled_line(r, cfg.split)] for r in records])
        done.append(entry)
    return done


# What stands in a row's line for the names the stage's process gives (`public`: the salted
# pseudonym where the domain pseudonymises), as JSON writes them; the line is otherwise final.
_KEY, _SOURCE, _GROUP = (_json_string(f"\0{what}\0") for what in ("key", "source", "group"))


def _unlabeled_line(record: Record, split: Any) -> tuple[str, str]:
    """(split, manifest line) of `record` with no label, rendered where it was read (a worker), with
    `_KEY`, `_SOURCE` and `_GROUP` where its names go: the stage's process only puts them in. The
    line is the record's size and metadata instead where a marker would not be found once exactly (a
    metadata value that spells one): `_row_line` then renders it whole."""
    fields = _unlabeled_row("\0key\0", "\0source\0", record.sha256, record.n_bytes, record.meta, record.group,
                            split, lambda kind, value: "\0group\0")
    line = json.dumps(fields, sort_keys=True, default=str)
    expected = ((_KEY, 1), (_SOURCE, 1), (_GROUP, 1 if record.group else 0))
    if all(line.count(marker) == count for marker, count in expected):
        return fields["split"], line
    return fields["split"], json.dumps([record.n_bytes, record.meta], default=str)


def _row_line(line: str, key: str, source: str, group: str | None, sha: str, split: Any, public: Namer) -> str:
    """The manifest line of a row read by `ingest_chunk`: its names put in (see `_unlabeled_line`)."""
    if line.startswith("["):  # the rare record whose metadata spells a marker: rendered here
        n_bytes, meta = json.loads(line)
        return json.dumps(_unlabeled_row(key, source, sha, n_bytes, meta, group, split, public), sort_keys=True,
                          default=str)
    line = line.replace(_KEY, _json_string(key), 1).replace(_SOURCE, _json_string(source), 1)
    return line.replace(_GROUP, _json_string(public("group", group)), 1) if group else line


def _unlabeled_row(key: str, source: str, sha: str, n_bytes: int, meta: dict[str, Any], group: str | None,
                   split: Any, public: Namer) -> dict[str, Any]:
    """A manifest row with no label (the metadata's fields beside the row's own, as ingest writes them)."""
    row = {"key": key, "source": source, "sha256": sha, "bytes": n_bytes, **meta}
    set_group_and_split(row, None, group, split, public)
    return row


def _hash_or_none(path: Path, keep: int) -> StampedRead:
    """The file's HashCache stamp (or None), sha256 and, when at most `keep`, its bytes: preprocess
    then checks the file by its stamp; the domain's reader takes the bytes instead of reading them
    again. A file gone or unreadable since the walk has no digest: the reader quarantines it."""
    try:
        return stamped_read(path, keep)
    except OSError:
        return StampedRead(None, None, None, file_stamp(path))


def ingest(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    """Run the ingest stage for one domain; returns its summary."""
    domain_name = cfg.name
    corpus = cfg.resolve(cfg.corpus)
    if not corpus.is_dir():
        raise PipelineError(f"corpus folder {cfg.corpus} not found; set domains.{domain_name}.corpus in params.yaml")
    with private_outputs(domain.pseudonymises(cfg)):
        return _ingest(cfg, domain, paths, corpus)


def _ingest(cfg: DomainConfig, domain: Domain, paths: DomainPaths, corpus: Path) -> dict[str, Any]:
    """Two passes over streams, so memory stays flat however large the corpus: the first reads every
    source (on the stage's engine) and writes rows, quarantine entries, duplicates and raw-file
    digests to scratch files as they come; the second gives each row its label, group and split
    and writes the manifest. What is held is per label (the labels CSV), never per file; exact
    duplicates are found through an index of content hashes on disk (`tasks.content_index`)."""
    domain_name = cfg.name
    public = public_namer(domain, cfg)
    if domain.pseudonymises(cfg):
        _warn_if_dvc_cache_open(paths.root)
    labels_file = cfg.resolve(cfg.labels) if cfg.labels else None
    private_labels = read_labels(labels_file, corpus, show_paths=not domain.pseudonymises(cfg))
    labels = {public("key", key): value for key, value in private_labels.items()}
    written_as = {public("key", key): key for key in private_labels}  # for the messages, never written
    recorder = LineageRecorder(f"ingest@{domain_name}", paths.manifest, root=paths.root,
                               params={"module": cfg.module, "corpus": str(cfg.corpus),
                                       "labels": str(cfg.labels) if cfg.labels else None,
                                       "split": asdict(cfg.split), "ingest": made_by(cfg.ingest),
                                       "privacy": {**asdict(cfg.privacy),
                                                   "pseudonymised": domain.pseudonymises(cfg)}})
    # what shapes a chunk's result: its rows' lines carry their splits (`_unlabeled_line`); `rows` is
    # the results' form, so that a kept chunk of an older form is not read back as this one
    work = chunked_work(cfg, paths, "ingest", {"module": cfg.module, "corpus": str(corpus), "rows": 2,
                                               "ingest": made_by(cfg.ingest), "split": asdict(cfg.split)},
                        max_items=domain.ingest_chunk_items)
    scratch = paths.work("ingest-scratch")  # this run's streams; a killed run's are dropped
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with _Pass(scratch, labels, cfg, public) as first:
            found = Discovery()
            first.read_corpus(domain, cfg, corpus, public, found, work)
        if found.links_followed:
            log.info("ingest %s: followed %d symlink(s) leaving the corpus (ingest.follow_symlinks), %d file(s) read "
                     "through them", domain_name, found.links_followed, found.files_through_links)
        # a label may name any file of a multi-file source (one slice of a DICOM series): it labels the source
        labels = _labels_by_source(labels, first.member_of, written_as, cfg, domain)
        assigned, missing, on_quarantined, conflicting = _assign_labels(labels, first)
        summary: dict[str, Any] = {}
        with atomic_dir(paths.manifest) as out:
            by_class: Counter = Counter()  # (label, split) of the labeled rows
            write_lines(out / "manifest.jsonl", _labeled_rows(first, assigned, summary, by_class))
            write_jsonl(out / "quarantine.jsonl", itertools.chain(*(iter_jsonl(scratch / name)
                                                                  for name in _Pass.QUARANTINE)))
            write_jsonl(out / "duplicates.jsonl", iter_jsonl(scratch / "duplicates.jsonl"))
            shutil.move(scratch / RAW_INPUTS, out / RAW_INPUTS)
            summary.update(labels_without_file=len(missing), labels_without_file_examples=missing[:10],
                           labels_on_quarantined_files=on_quarantined, labels_conflicting_on_duplicates=conflicting,
                           files=first.listed + found.hidden, sources=first.sources,
                           symlinks_followed_out_of_corpus=found.links_followed, hidden_files_skipped=found.hidden,
                           records=first.rows, quarantined=first.quarantined, duplicates_dropped=first.duplicates,
                           pseudonymised=domain.pseudonymises(cfg))
            problem = (_quarantine_problem(cfg, domain, paths, first.rows, first.quarantined, first.reasons)
                       or _missing_labels_problem(cfg, domain, missing, labels, written_as,
                                                  lambda: _corpus_keys(cfg, corpus))
                       or _class_problem(cfg, domain, by_class, labels))
            if problem:  # the manifest is still written, so the quarantine list can be read; preprocess refuses it
                summary["stopped"] = problem
            write_json(out / "summary.json", summary)
            recorder.raw_inputs_file = (RAW_INPUTS, first.raw_files)
            recorder.write(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    work.finish()
    if problem:
        raise PipelineError(problem)
    log.info("ingest %s: %d records, %d quarantined, %d duplicates dropped, %d labeled",
             domain_name, first.rows, first.quarantined, first.duplicates, summary["labeled"])
    return summary


RAW_INPUTS = "raw_inputs.jsonl"  # every raw file's key and sha256, in the order ingest read them


def _raw_input_line(key: str, digest: str | None) -> str:
    """`json.dumps({"key": key, "sha256": digest}, sort_keys=True)` and a newline, the same bytes
    from json's own string encoder without a dict and an encoder pass a file."""
    return f'{{"key": {_json_string(key)}, "sha256": {"null" if digest is None else _json_string(digest)}}}\n'


class _Pass:
    """Ingest's first pass: the corpus read as a stream, everything per file written to scratch
    files as it comes (rows as the manifest takes them when no label lands on them, quarantine
    entries, duplicates, raw digests); held in memory only what concerns the labels' keys, and
    counts. The rows a label may land on are noted by line, with their reader's private group, for
    the second pass to rewrite; it copies every other line as it is."""

    QUARANTINE = ("set_aside.jsonl", "unsupported.jsonl", "rejected.jsonl", "unreadable.jsonl")  # in this order
    BATCH = 512  # records checked against the index of contents at once (one query, one insert)

    def __init__(self, scratch: Path, labels: dict[str, dict[str, Any]], cfg: DomainConfig, public: Namer) -> None:
        self.scratch, self.labels, self.split, self.public = scratch, labels, cfg.split, public
        self.by_split: Counter = Counter()  # the rows' splits as first written (before any label)
        self.candidates: dict[str, tuple[int, str | None]] = {}  # row key a label may land on -> (line, private group)
        self.pending: list[tuple[str, str, dict[str, Any]]] = []  # (key, source key, record) to check for copies
        self.listed = self.sources = self.rows = self.duplicates = self.quarantined = self.raw_files = 0
        self.reasons: Counter = Counter()  # quarantine reasons by kind
        self.member_of: dict[str, str] = {}  # labeled file of a multi-file source -> the source's key
        self.labeled_sources: set[str] = set()  # those sources' keys
        self.alias: dict[str, str] = {}  # labeled duplicate -> the key kept
        self.present: set[str] = set()  # labeled keys that are rows
        self.quarantined_labels: set[str] = set()  # labeled keys quarantined

    def __enter__(self) -> _Pass:
        self.streams = {name: open(self.scratch / name, "w", encoding="utf-8")
                        for name in ("rows.jsonl", "duplicates.jsonl", RAW_INPUTS, *self.QUARANTINE)}
        self.contents = ContentIndex(self.scratch / "contents.sqlite")
        return self

    def __exit__(self, *exc: Any) -> None:
        for stream in self.streams.values():
            stream.close()
        self.contents.close()

    def labeled(self, key: str) -> bool:
        """Whether a label may land on `key`: one names it, or names a file of its source."""
        return key in self.labels or key in self.labeled_sources

    def write(self, name: str, value: Any) -> None:
        self.streams[name].write(json.dumps(value, sort_keys=True, default=str) + "\n")

    def quarantine(self, name: str, entry: dict[str, str]) -> None:
        self.write(name, entry)
        self.quarantined += 1
        self.reasons[reason_kind(entry["reason"])] += 1
        if self.labeled(entry["key"]):
            self.quarantined_labels.add(entry["key"])

    def items(self, stream: Iterator[tuple[str, str, Any]], domain: Domain, corpus: Path,
              public: Namer) -> Iterator[tuple[str, Any]]:
        """Ingest's items from discovery's stream: each source, and each file no source reads (hashed only)."""
        reads = unsupported_reason(domain)
        for kind, key, value in stream:
            if kind == "listed":
                self.listed += 1
            elif kind == "unsupported":
                self.quarantine("unsupported.jsonl", {"key": key, "reason": reads})
                yield "file", value
            elif kind == "unread":
                yield "file", value
            elif kind == "rejected":
                self.quarantine("rejected.jsonl", value)
            else:
                self.sources += 1
                if len(value.paths) > 1:
                    for path in value.paths:
                        member = public("key", relative_key(path, corpus))
                        if member in self.labels:
                            self.member_of[member] = key
                            self.labeled_sources.add(key)  # before its rows come back from the engine
                yield "source", value

    def read_corpus(self, domain: Domain, cfg: DomainConfig, corpus: Path, public: Namer, found: Discovery,
                    work: Any) -> None:
        items = self.items(discover_stream(domain, cfg, public, found), domain, corpus, public)
        progress = tqdm(desc=f"ingest {cfg.name}", unit="source", disable=None)
        raw_inputs = self.streams[RAW_INPUTS]
        with running_on(work):
            for done in run_items(ingest_chunk, cfg, items, lambda item: _identity(item, corpus), _unchanged):
                for file, digest in zip(done["files"], done["hashes"]):
                    raw_inputs.write(_raw_input_line(public("key", file), digest))
                    self.raw_files += 1
                for stamp, digest in zip(done["stamps"], done["hashes"]):
                    remember_digest(stamp, digest)
                if done["source"] is not None:
                    progress.update()
                    self.read_source(done, public)
        self.check_pending()
        progress.close()
        for entry in found.set_aside:  # complete once the walk is over: links not followed, pipes
            self.quarantine("set_aside.jsonl", entry)

    def read_source(self, done: dict[str, Any], public: Namer) -> None:
        source_key = public("key", done["source"])
        for item in done["rejected"]:
            self.quarantine("unreadable.jsonl", {"key": public("key", item["key"]), "reason": item["reason"]})
        self.pending.extend((public("key", key), source_key, sha, group, split, line)
                            for key, sha, group, split, line in done["records"])
        if len(self.pending) >= self.BATCH:
            self.check_pending()

    def check_pending(self) -> None:
        """The records waiting, in order, against the index of contents (one query for them all):
        the first record of a content becomes a row, each later one a duplicate of it."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        kept = self.contents.find(list({sha for _, _, sha, *_ in pending}))
        new, rows = [], self.streams["rows.jsonl"]
        for key, source_key, sha, group, split, line in pending:
            if sha in kept:
                kept_key, kept_line, kept_group = kept[sha]
                if self.labeled(key):
                    self.alias[key] = kept_key
                    self.candidates[kept_key] = (kept_line, kept_group)
                self.write("duplicates.jsonl", {"key": key, "duplicate_of": kept_key})
                self.duplicates += 1
                continue
            group = group or None
            kept[sha] = (key, self.rows, group)
            new.append((sha, key, self.rows, group))
            if self.labeled(key):
                self.present.add(key)
                self.candidates[key] = (self.rows, group)
            self.by_split[split] += 1
            rows.write(_row_line(line, key, source_key, group, sha, self.split, self.public) + "\n")
            self.rows += 1
        self.contents.add(new)


def set_group_and_split(row: dict[str, Any], label: str | None, group: str | None, split: Any, public: Namer) -> None:
    """A manifest row's label, group (the private `group` as the namer writes it) and split. The
    split hashes the private group with the public split salt, so it does not depend on the
    pseudonym salt: the same data splits the same way on every machine."""
    row["label"] = label
    row["group"] = public("group", group) if group else None
    row["split"] = assign_split(group or row["sha256"], split.val, split.test, split.salt)


def _corpus_keys(cfg: DomainConfig, corpus: Path) -> list[str]:
    """Every file of the corpus, corpus-relative (walked again: only a failing run's message needs them)."""
    listing = corpus_files(corpus, cfg.resolve(cfg.labels) if cfg.labels else None,
                           follow_symlinks=bool(getattr(cfg.ingest, "follow_symlinks", False)))
    return [key for key in (relative_key(path, corpus) for path in listing.files) if not is_hidden(key)]


def _labels_by_source(labels: dict[str, dict[str, Any]], member_of: dict[str, str], written_as: dict[str, str],
                      cfg: DomainConfig, domain: Domain) -> dict[str, dict[str, Any]]:
    """The labels keyed by the source they label: a label may name any file of a multi-file source
    (one slice of a DICOM series); two files of one source labeled differently are refused."""
    by_source: dict[str, dict[str, Any]] = {}
    for key, value in labels.items():
        source = member_of.get(key, key)
        if source in by_source:
            first = by_source[source]
            if (first["label"], first["group"]) != (value["label"], value["group"]):
                private = domain.pseudonymises(cfg)
                which = "" if private else f" ({written_as[first['key']]!r} and {written_as[key]!r})"
                what = "labels" if first["label"] != value["label"] else "groups"
                values = (f" ({first['label']!r} and {value['label']!r})" if what == "labels" or not private
                          else "")
                raise PipelineError(f"{cfg.labels}: lines {first['line']} and {value['line']} name two files of one "
                                    f"source{which} with different {what}{values}; a source takes one label: keep "
                                    "one row")
            continue
        by_source[source] = {**value, "key": key}
    return {source: {k: v for k, v in value.items() if k != "key"} for source, value in by_source.items()}


def _warn_if_dvc_cache_open(root: Path) -> None:
    """DVC copies every output into its cache (`.dvc/cache`), whose folders follow the umask of the
    `dvc` command and whose files are 0444: a pseudonymising domain's data there is readable by
    any local user unless the cache folder is closed."""
    cache = root / ".dvc" / "cache"
    if cache.is_dir() and cache.stat().st_mode & 0o077:
        log.warning("DVC's cache %s is open to other local users (mode %04o) and will hold this domain's "
                    "manifest, shards and models: run `chmod 700 %s` (and keep `cache.shared` unset)",
                    cache, cache.stat().st_mode & 0o777, cache)


def _quarantine_problem(cfg: DomainConfig, domain: Domain, paths: DomainPaths, rows: int, quarantined: int,
                        reasons: Counter) -> str | None:
    """Too large a quarantined share (or nothing usable): the corpus or the reader settings are wrong."""
    where, limit = f"ingest@{cfg.name}", cfg.ingest.max_quarantined_fraction
    total = rows + quarantined
    if total == 0:
        return (f"{where}: the corpus folder {cfg.corpus} holds no file to read ({domain.name} reads "
                f"{', '.join(domain.suffixes)}); point domains.{cfg.name}.corpus at the data")
    share = quarantined / total
    if rows and share <= limit:
        return None
    common = "; ".join(f"{reason!r} x{count}" for reason, count in reasons.most_common(3))
    listed = f"see {paths.manifest.relative_to(paths.root).as_posix()}/quarantine.jsonl"
    if not rows:
        return (f"{where}: every one of the {total} files or records was quarantined (most common: {common}); "
                f"{listed}, and fix the corpus or the ingest settings")
    return (f"{where}: {quarantined} of {total} files or records quarantined ({share:.0%}, above "
            f"ingest.max_quarantined_fraction {limit:.0%}; most common: {common}); {listed}, fix the corpus or "
            f"the ingest settings, or raise domains.{cfg.name}.ingest.max_quarantined_fraction")


def reason_kind(reason: str) -> str:
    """A reason without its particulars (`text too short (3 characters)` -> `text too short`), to count."""
    return reason.split(" (", 1)[0].split(": ", 1)[0][:80]


def _missing_labels_problem(cfg: DomainConfig, domain: Domain, missing: list[str],
                            labels: dict[str, dict[str, Any]], written_as: dict[str, str],
                            corpus_keys: Callable[[], list[str]]) -> str | None:
    """Labels that name no file: a wrong folder in the paths, or files left out of the corpus.
    No tolerance: a label that reaches no file is a sample the user thinks is trained or scored."""
    if not missing:
        return None
    private = domain.pseudonymises(cfg)
    if private:  # file names may hold a patient's name: name the CSV lines instead
        lines = sorted(labels[key]["line"] for key in missing)
        examples = "lines " + ", ".join(str(line) for line in lines[:3]) + (", ..." if len(lines) > 3 else "")
    else:
        examples = ", ".join(repr(written_as[key]) for key in missing[:3]) + (", ..." if len(missing) > 3 else "")
    hint = _path_hint([written_as[key] for key in missing], corpus_keys(), private)
    return (f"{cfg.labels}: {len(missing)} of {len(labels)} labels name no file in the corpus folder {cfg.corpus} "
            f"({examples}){hint}; write each path relative to the corpus folder, or remove those rows")


def _path_hint(missing: list[str], corpus_keys: list[str], private: bool) -> str:
    """Why labels miss, when most of them match corpus files once a leading folder is dropped
    (`corpus/doc0.txt` for `doc0.txt`) or added (`doc0.txt` for `contracts/doc0.txt`)."""
    present = set(corpus_keys)
    by_name: dict[str, list[str]] = {}
    for key in corpus_keys:
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    dropped: Counter = Counter()
    added: Counter = Counter()
    for key in missing:
        file_key = key.split("#", 1)[0]
        parts = file_key.split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[cut:]) in present:
                dropped["/".join(parts[:cut]) + "/"] += 1
                break
        else:
            for candidate in by_name.get(parts[-1], []):
                if candidate.endswith("/" + file_key):
                    added[candidate[: -len(file_key)]] += 1
                    break
    for counts, how in ((dropped, "without"), (added, "under")):
        if counts:
            folder, count = counts.most_common(1)[0]
            if count * 2 >= len(missing):
                shown = "a leading folder" if private else f"`{folder}`"
                what = "their paths look relative to a folder above the corpus" if how == "without" else \
                    "their paths look relative to a folder inside the corpus"
                return f"; {count} of them match a corpus file {how} {shown}: {what}"
    return ""


def _class_problem(cfg: DomainConfig, domain: Domain, by_class: Counter,
                   labels: dict[str, dict[str, Any]]) -> str | None:
    """Every class of the labels needs a labeled row in the train split, or no probe can learn it."""
    classes = sorted({value["label"] for value in labels.values()})
    if not classes:
        return None
    if domain.splits_labeled_rows_at_preprocess(cfg):
        return None  # tiles take their spatial block's split in preprocess, which checks then
    splits_of: dict[str, Counter] = {c: Counter() for c in classes}
    for (label, split), count in by_class.items():
        splits_of[label][split] += count
    lacking = [c for c in classes if not splits_of[c]["train"]]
    if not lacking:
        return None
    described = []
    for name in lacking[:3]:
        found = splits_of[name]
        where = (", ".join(f"{n} in {s}" for s, n in sorted(found.items())) if found
                 else "none readable: its files are quarantined, or copies of files labeled otherwise")
        described.append(f"{name!r} ({where})")
    more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
    return (f"{cfg.labels}: {len(lacking)} class(es) have no labeled example in the train split: "
            f"{', '.join(described)}{more}; label more examples of each (from more groups, since a group's rows "
            f"share a split), or drop the class from the labels")


def _assign_labels(labels: dict[str, dict[str, Any]],
                   first: _Pass) -> tuple[dict[str, dict[str, Any]], list[str], int, int]:
    """Which row each label lands on (a label on a dropped duplicate labels the copy kept; of two
    different labels for one content the first in the CSV stays), with the label's group when it
    gives one; and the (public) keys of the labels that name no file, the count of labels on
    quarantined files and of labels conflicting on duplicates."""
    assigned: dict[str, dict[str, Any]] = {}  # row key -> {"label", "group" (private, or None)}
    missing, on_quarantined, conflicting = [], 0, 0
    for key, value in labels.items():
        if key not in first.alias and key not in first.present:
            if key in first.quarantined_labels:
                on_quarantined += 1
            else:
                missing.append(key)
            continue
        row_key = first.alias.get(key, key)
        current = assigned.get(row_key)
        if current is not None and current["label"] != value["label"]:
            conflicting += 1  # two identical files labeled differently: the first label stays
            continue
        assigned[row_key] = {"label": value["label"],
                             "group": value["group"] or (current["group"] if current else None)}
    return assigned, missing, on_quarantined, conflicting


def _labeled_rows(first: _Pass, assigned: dict[str, dict[str, Any]], summary: dict[str, Any],
                  by_class: Counter) -> Iterator[str]:
    """The manifest's lines: the first pass' rows, each line a label lands on rewritten with the
    label, the group (the labels CSV's, else the reader's) and the split that follows; every other
    line as the first pass wrote it. The counts by split go into `summary`, the labeled rows'
    (label, split) into `by_class`."""
    rewrite = {first.candidates[key][0]: (given, first.candidates[key][1]) for key, given in assigned.items()}
    by_split = Counter(first.by_split)
    labeled_by_split: Counter = Counter()
    with open(first.scratch / "rows.jsonl", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number in rewrite:
                (given, reader_group), row = rewrite[number], json.loads(line)
                by_split[row["split"]] -= 1
                set_group_and_split(row, given["label"], given["group"] or reader_group, first.split, first.public)
                by_split[row["split"]] += 1
                labeled_by_split[row["split"]] += 1
                by_class[row["label"], row["split"]] += 1
                line = json.dumps(row, sort_keys=True, default=str) + "\n"
            yield line
    summary.update(labeled=sum(labeled_by_split.values()),
                   labeled_by_split={s: labeled_by_split[s] for s in ("train", "val", "test")},
                   records_by_split={s: by_split[s] for s in ("train", "val", "test")})
