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
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ssl_models.core.config import DomainConfig, made_by
from ssl_models.core.domain import Domain, Record, Rejected, Source, get_domain
from ssl_models.core.errors import PipelineError, UnreadableFileError
from ssl_models.core.hashing import remember_digest, stamped_sha256
from ssl_models.core.privacy import without_names
from ssl_models.core.splits import assign_split
from ssl_models.core.workers import file_stamp, run_items, running_on
from tasks.io import atomic_dir, private_outputs, write_json, write_jsonl
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.sources import Discovery, Namer, discover, public_namer, relative_key
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


def _work_items(found: Discovery, corpus: Path) -> tuple[list[tuple[str, Any]], list[list[tuple[Any, ...]]]]:
    """Ingest's items: the sources (each with its files), then the files no source reads (hashed
    only); and each item's identity: its files' paths, sizes and times."""
    items: list[tuple[str, Any]] = [("source", source) for source in found.sources.values()]
    in_sources = {path for source in found.sources.values() for path in source.paths}
    items += [("file", path) for _, path in found.files if path not in in_sources]
    identities = [[(relative_key(path, corpus), *file_stamp(path)) for path in
                   (item.paths if kind == "source" else [item])] for kind, item in items]
    return items, identities


def ingest_chunk(job: tuple[DomainConfig, list[tuple[str, Any]]]) -> list[dict[str, Any]]:
    """One chunk of ingest, in any process: each source read by the domain's reader and its files
    hashed, each file no source reads hashed. Plain JSON-ready values (see tasks/workers.py)."""
    cfg, chunk = job
    domain = get_domain(cfg.module)
    corpus = cfg.resolve(cfg.corpus)
    done = []
    for kind, item in chunk:
        files = item.paths if kind == "source" else [item]
        hashed = [_hash_or_none(path) for path in files]
        entry: dict[str, Any] = {"files": [relative_key(path, corpus) for path in files],
                                 "hashes": [digest for _, digest in hashed], "stamps": [stamp for stamp, _ in hashed],
                                 "source": None}
        if kind == "source":
            records, rejected = read_source(domain, item, cfg)
            entry.update(source=item.key, rejected=rejected,
                         records=[{"key": r.key, "sha256": r.sha256, "n_bytes": r.n_bytes, "meta": r.meta,
                                   "group": r.group} for r in records])
        done.append(entry)
    return done


def _hash_or_none(path: Path) -> tuple[Any, str | None]:
    """(HashCache stamp or None, sha256 or None): preprocess then checks the file by its stamp."""
    try:
        return stamped_sha256(path)
    except OSError:  # gone or unreadable since the walk: the reader quarantines it
        return None, None


def ingest(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    """Run the ingest stage for one domain; returns its summary."""
    domain_name = cfg.name
    corpus = cfg.resolve(cfg.corpus)
    if not corpus.is_dir():
        raise PipelineError(f"corpus folder {cfg.corpus} not found; set domains.{domain_name}.corpus in params.yaml")
    with private_outputs(domain.pseudonymises(cfg)):
        return _ingest(cfg, domain, paths, corpus)


def _ingest(cfg: DomainConfig, domain: Domain, paths: DomainPaths, corpus: Path) -> dict[str, Any]:
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
    found = discover(domain, cfg, public)
    # a label may name any file of a multi-file source (one slice of a DICOM series): it labels the source
    member_of = {public("key", relative_key(path, corpus)): key
                 for key, source in found.sources.items() if len(source.paths) > 1 for path in source.paths}
    labels = _labels_by_source(labels, member_of, written_as, cfg, domain)
    if found.links_followed:
        log.info("ingest %s: followed %d symlink(s) leaving the corpus (ingest.follow_symlinks), %d file(s) read "
                 "through them", domain_name, found.links_followed, found.files_through_links)
    quarantine = found.quarantined(domain)
    rows: list[dict[str, Any]] = []
    duplicates: list[dict[str, str]] = []
    canonical: dict[str, str] = {}  # content hash -> first key with it
    alias: dict[str, str] = {}  # duplicate key -> kept key
    reader_groups: dict[str, str] = {}  # key -> the group a reader found (a patient), private
    work = chunked_work(cfg, paths, "ingest", {"module": cfg.module, "corpus": str(corpus),
                                               "ingest": made_by(cfg.ingest)})
    items, identities = _work_items(found, corpus)
    file_hashes: dict[str, str] = {}  # corpus-relative path -> sha256, private
    progress = tqdm(total=len(found.sources), desc=f"ingest {domain_name}", unit="source", disable=None)
    with running_on(work):
        for done in run_items(ingest_chunk, cfg, items, identities):
            file_hashes.update(zip(done["files"], done["hashes"]))
            for stamp, digest in zip(done["stamps"], done["hashes"]):
                remember_digest(stamp, digest)
            if done["source"] is None:
                continue
            progress.update()
            source_key = public("key", done["source"])
            quarantine.extend({"key": public("key", item["key"]), "reason": item["reason"]}
                              for item in done["rejected"])
            for record in done["records"]:
                key = public("key", record["key"])
                if record["sha256"] in canonical:
                    alias[key] = canonical[record["sha256"]]
                    duplicates.append({"key": key, "duplicate_of": canonical[record["sha256"]]})
                    continue
                canonical[record["sha256"]] = key
                if record["group"]:
                    reader_groups[key] = record["group"]
                rows.append({"key": key, "source": source_key, "sha256": record["sha256"],
                             "bytes": record["n_bytes"], **record["meta"]})
    progress.close()
    raw_inputs = {key: file_hashes[relative_key(path, corpus)] for key, path in found.files}
    summary, missing = _attach_labels_and_splits(rows, labels, reader_groups, alias, quarantine, cfg, public)
    summary.update(files=len(found.files) + found.hidden, sources=len(found.sources),
                   symlinks_followed_out_of_corpus=found.links_followed,
                   hidden_files_skipped=found.hidden, records=len(rows),
                   quarantined=len(quarantine), duplicates_dropped=len(duplicates),
                   pseudonymised=domain.pseudonymises(cfg))
    corpus_keys = [relative_key(path, corpus) for _, path in found.files]
    problem = (_quarantine_problem(cfg, domain, paths, rows, quarantine)
               or _missing_labels_problem(cfg, domain, missing, labels, written_as, corpus_keys)
               or _class_problem(cfg, domain, rows, labels))
    if problem:  # the manifest is still written, so the quarantine list can be read; preprocess refuses it
        summary["stopped"] = problem
    with atomic_dir(paths.manifest) as out:
        write_jsonl(out / "manifest.jsonl", rows)
        write_jsonl(out / "quarantine.jsonl", quarantine)
        write_jsonl(out / "duplicates.jsonl", duplicates)
        write_json(out / "summary.json", summary)
        recorder.raw_inputs = raw_inputs
        recorder.write(out)
    work.finish()
    if problem:
        raise PipelineError(problem)
    log.info("ingest %s: %d records, %d quarantined, %d duplicates dropped, %d labeled",
             domain_name, len(rows), len(quarantine), len(duplicates), summary["labeled"])
    return summary


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


def _quarantine_problem(cfg: DomainConfig, domain: Domain, paths: DomainPaths, rows: list[dict[str, Any]],
                        quarantine: list[dict[str, str]]) -> str | None:
    """Too large a quarantined share (or nothing usable): the corpus or the reader settings are wrong."""
    where, limit = f"ingest@{cfg.name}", cfg.ingest.max_quarantined_fraction
    total = len(rows) + len(quarantine)
    if total == 0:
        return (f"{where}: the corpus folder {cfg.corpus} holds no file to read ({domain.name} reads "
                f"{', '.join(domain.suffixes)}); point domains.{cfg.name}.corpus at the data")
    share = len(quarantine) / total
    if rows and share <= limit:
        return None
    reasons = Counter(reason_kind(q["reason"]) for q in quarantine).most_common(3)
    common = "; ".join(f"{reason!r} x{count}" for reason, count in reasons)
    listed = f"see {paths.manifest.relative_to(paths.root).as_posix()}/quarantine.jsonl"
    if not rows:
        return (f"{where}: every one of the {total} files or records was quarantined (most common: {common}); "
                f"{listed}, and fix the corpus or the ingest settings")
    return (f"{where}: {len(quarantine)} of {total} files or records quarantined ({share:.0%}, above "
            f"ingest.max_quarantined_fraction {limit:.0%}; most common: {common}); {listed}, fix the corpus or "
            f"the ingest settings, or raise domains.{cfg.name}.ingest.max_quarantined_fraction")


def reason_kind(reason: str) -> str:
    """A reason without its particulars (`text too short (3 characters)` -> `text too short`), to count."""
    return reason.split(" (", 1)[0].split(": ", 1)[0][:80]


def _missing_labels_problem(cfg: DomainConfig, domain: Domain, missing: list[str],
                            labels: dict[str, dict[str, Any]], written_as: dict[str, str],
                            corpus_keys: list[str]) -> str | None:
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
    hint = _path_hint([written_as[key] for key in missing], corpus_keys, private)
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


def _class_problem(cfg: DomainConfig, domain: Domain, rows: list[dict[str, Any]],
                   labels: dict[str, dict[str, Any]]) -> str | None:
    """Every class of the labels needs a labeled row in the train split, or no probe can learn it."""
    classes = sorted({value["label"] for value in labels.values()})
    if not classes:
        return None
    if domain.splits_labeled_rows_at_preprocess(cfg):
        return None  # tiles take their spatial block's split in preprocess, which checks then
    splits_of: dict[str, Counter] = {c: Counter() for c in classes}
    for row in rows:
        if row["label"] is not None:
            splits_of[row["label"]][row["split"]] += 1
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


def _attach_labels_and_splits(rows: list[dict[str, Any]], labels: dict[str, dict[str, str | None]],
                              reader_groups: dict[str, str], alias: dict[str, str],
                              quarantine: list[dict[str, str]], cfg: DomainConfig,
                              public: Namer) -> tuple[dict[str, Any], list[str]]:
    """Label each row, give it its group (the labels CSV's, else the reader's) and its split.
    The split hashes the private group with the public split salt, so it does not depend on the
    pseudonym salt: the same data splits the same way on every machine. Also returns the (public)
    keys of the labels that name no file."""
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
            "labels_on_quarantined_files": on_quarantined, "labels_conflicting_on_duplicates": conflicting}, missing
