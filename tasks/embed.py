"""`ssl-pipeline embed DOMAIN|EXPORT_DIR FOLDER --out FILE`: any folder of raw files -> one embedding per record.

DOMAIN is a block of the project's params.yaml (its pretrained encoder); EXPORT_DIR is a folder
`ssl-pipeline export` wrote, for a team that received it: the block it carries (ssl_pipeline.json)
and its encoder (`Domain.load_export`), checked against its manifest first (`export_target`).

The folder goes through exactly the code the stages run: ingest's discovery, reader and
quarantine (`tasks.sources.discover`, `ingest.read_source`), its pseudonyms (`public_namer`, with
the project's salt: a file gets the pseudonym the pipeline gives it at the same path), the
domain's own `preprocess` into shards, and the embedding the fine-tune stage fits its probes on
(`tasks.probes.embed_rows`: the encoder's `collate` and `forward`, the same precision). A record
that preprocessing cuts into several rows (a slide's tiles) gets the mean of their embeddings,
the rule the encoder itself applies to a slide's bag of tiles and a document's windows.

The folder is worked through in chunks of whole sources, a few batches' worth of rows each:
read -> manifest rows -> `domain.preprocess` into a temporary folder -> rows read back -> embedded
-> appended to the Parquet file as one row group -> temporary files deleted. On a GPU a background
thread prepares the next chunk while this one is embedded (`reads_ahead`). Memory holds the
folder's listing (paths, as ingest's discovery does) and at most two chunks, never the contents,
rows or embeddings of the whole folder.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.domain import Domain, Source
from ssl_models.core.errors import PipelineError
from ssl_models.core.hashing import sha256_file
from ssl_models.core.privacy import without_names
from ssl_models.core.shards import LABELED
from tasks.export import MANIFEST, SETTINGS, check_init, encoder_folder, read_settings, verify
from tasks.io import atomic_file, read_json
from tasks.lineage import RECORD_NAME
from tasks.paths import DomainPaths
from tasks.sources import Namer, discover, public_namer
from tasks.stages.ingest import read_source, reason_kind

if TYPE_CHECKING:
    import numpy as np

    from ssl_models.core.modules import Encoder

log = logging.getLogger("embed")

# rows of a chunk: about this many batches (a source is never split across chunks). Each chunk pays
# fixed costs (preprocess's shard folders, its tokenizer files): 4 batches cost 17% of a pass of the
# legal encoder on the CPU, 16 about 8% (BENCHMARKS.md); memory holds one chunk whatever the folder
CHUNK_BATCHES = 16
# what preprocess needs of a manifest row beyond ingest's: every record "labeled" (so it reaches the
# `labeled` shard, the rows the probes are fitted on) and in the test split (pretrained on by nobody:
# no pretraining rows are built for it)
NEUTRAL_ROW = {"label": "unlabeled", "group": None, "split": "test"}


@dataclass(frozen=True)
class Target:
    """What embeds the folder: the domain block's config and domain, and its encoder (loaded on
    demand: torch and the weights load only once the folder has been checked)."""

    cfg: DomainConfig
    domain: Domain
    load_encoder: Callable[[], Encoder]
    about: dict[str, str]  # written into the Parquet file's metadata


def embedding_target(root: Path, domain_name: str, init: str) -> Target:
    """The config and encoder that embed the folder: with a block name, that block of `root`/params.yaml
    and its `ssl` encoder (the one the pretrain stage saved) or its `generic` checkpoint; with an export
    folder (`ssl-pipeline export` wrote it: manifest.json and ssl_pipeline.json), the block it carries and
    its encoder (`export_target`). One clear line when there is none. (The one place that decides which
    encoder and config embed a folder.)"""
    check_init(init, "embed")
    given = Path(domain_name)
    if given.is_dir() and ((given / MANIFEST).exists() or (given / SETTINGS).exists()):
        return export_target(root, given, init)
    try:
        cfg, domain = load_config(domain_name, root / "params.yaml")
    except PipelineError as error:
        if given.is_dir():
            raise PipelineError(f"embed {domain_name}: a folder without {MANIFEST}, so no export; give the folder "
                                f"`ssl-pipeline export` wrote, or a block of params.yaml ({error})") from None
        raise
    paths = DomainPaths(domain_name, root)
    encoder_dir = encoder_folder(cfg, domain, paths, init, "embed")
    about = {"domain": domain_name, "module": cfg.module, "init": init}
    if init == "ssl":
        about["encoder_outputs_digest"] = str(read_json(paths.pretrain / RECORD_NAME).get("outputs_digest"))
    else:
        about["checkpoint"] = str(domain.generic_checkpoint(cfg))
    return Target(cfg, domain, lambda: domain.load_encoder(init, cfg, paths.shards, encoder_dir, seed=0), about)


def export_target(root: Path, folder: Path, init: str) -> Target:
    """The encoder of an export folder and the block it carries (ssl_pipeline.json: the readers',
    preprocessing's and model's settings the run used), for a team without the exporting project:
    no params.yaml, runs or salt of it are needed. The folder must match its manifest. Where the
    block pseudonymises, keys are salted with `root`'s own salt (privacy.salt_file under `root`,
    made on first use as ingest makes it): pseudonyms of the receiving team, not the exporter's."""
    if init != "ssl":
        raise PipelineError(f"embed --init {init}: an export folder holds one encoder, the one it was exported "
                            "with; leave out --init")
    problems = verify(folder)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise PipelineError(f"embed: the export {folder} does not match its {MANIFEST} ({shown}): it changed "
                            "after the export; use an intact copy (`ssl-pipeline export verify` checks one)")
    if not (folder / SETTINGS).exists():
        raise PipelineError(f"embed: the export {folder} holds no {SETTINGS} (exported by an earlier ssl-pipeline): "
                            "export the encoder again to embed with it")
    cfg, domain, settings = read_settings(folder, root)
    about = {"domain": cfg.name, "module": cfg.module, "init": str(settings["init"]),
             "export_manifest_sha256": sha256_file(folder / MANIFEST)}
    return Target(cfg, domain, lambda: domain.load_export(cfg, folder), about)


def quarantine_path(out: Path) -> Path:
    """Where the quarantine list of `out` goes: `<out stem>.quarantine.jsonl` beside it."""
    return out.with_name(f"{out.stem}.quarantine.jsonl")


def embed(root: Path, domain_name: str, folder: Path, out: Path, init: str = "ssl", batch_size: int = 64,
          device: str | None = None) -> dict[str, Any]:
    """Embed every record of `folder` with `domain_name`'s `init` encoder into the Parquet file `out`
    (columns `key`: the record's key, a pseudonym where the domain pseudonymises; `embedding`: the
    encoder's float32 vector), written whole or not at all. Files and records that cannot be used
    go, with their reason, to `<out stem>.quarantine.jsonl` beside it, which is always written
    (empty when nothing was quarantined). Returns the counts and paths."""
    target = embedding_target(root, domain_name, init)
    cfg, domain = target.cfg, target.domain
    private = domain.pseudonymises(cfg)
    if batch_size < 1:
        raise PipelineError(f"embed --batch-size {batch_size}: must be at least 1")
    shown = "the folder given" if private else str(folder)  # a folder name may name a patient
    if not folder.is_dir():
        raise PipelineError(f"embed: {shown} is not a folder (or does not exist); give the folder of raw files "
                            "to embed")
    out = Path(out)
    if out.is_dir():
        raise PipelineError(f"embed --out {out}: is a folder; give the Parquet file to write, "
                            f"e.g. {out / 'embeddings.parquet'}")
    folder_cfg = copy.copy(cfg)  # the block as the stages see it, pointed at the folder, without labels
    folder_cfg.corpus, folder_cfg.labels = folder.absolute(), None
    public = public_namer(domain, folder_cfg)
    found = discover(domain, folder_cfg, public)
    n_files = len(found.files)
    found.files.clear()  # the listing is kept once (in `sources`), not twice
    if not found.sources and not found.unsupported and not found.rejected:
        hidden = f" ({found.hidden} hidden file(s) skipped)" if found.hidden else ""
        raise PipelineError(f"embed: {shown} holds no file to read{hidden}; {domain.name} reads "
                            f"{', '.join(domain.suffixes)}")
    torch_device = _device(device)
    log.info("embed %s: %d file(s), %d source(s) to read (%d hidden file(s) skipped), %s encoder on %s",
             domain_name, n_files, len(found.sources), found.hidden, init, torch_device)
    encoder = target.load_encoder().to(torch_device).eval()
    quarantine_file = quarantine_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(quarantine_file) as quarantine_tmp, open(quarantine_tmp, "w", encoding="utf-8") as handle:
        quarantine = Quarantine(handle)
        quarantine.add(found.quarantined(domain))
        try:
            with atomic_file(out) as parquet_tmp:
                embedded = _embed_sources(target, folder_cfg, found.sources, public, encoder, batch_size,
                                          parquet_tmp, quarantine, prepare_ahead=reads_ahead(torch_device))
                if not embedded:
                    raise _NothingEmbedded
        except _NothingEmbedded:
            embedded = 0
    if not embedded:
        common = "; ".join(f"{reason!r} x{count}" for reason, count in quarantine.kinds.most_common(3))
        raise PipelineError(f"embed: no readable file in {shown}: every one of its {quarantine.count} files or "
                            f"records was quarantined (most common: {common}); see {quarantine_file}")
    log.info("embed %s: %d embedded, %d quarantined -> %s (quarantine list: %s)", domain_name, embedded,
             quarantine.count, out, quarantine_file)
    return {"embedded": embedded, "quarantined": quarantine.count, "out": str(out),
            "quarantine": str(quarantine_file), "dim": int(encoder.dim)}


def reads_ahead(device: Any) -> bool:
    """Whether the next chunk is read and preprocessed in a background thread while this one is
    embedded: where the encoder runs on an accelerator, whose forward leaves the CPU cores free.
    On the CPU the forward's threads already use every core, and the preprocessing's own torch
    work (MONAI's and the tiling's transforms) would start a second team of threads beside them;
    there the chunks take turns (legal on 2 busy cores: the thread's passes within the noise of
    these, BENCHMARKS.md)."""
    return device.type != "cpu"


class _NothingEmbedded(Exception):
    """Raised inside the Parquet file's write so that it is dropped, not renamed in."""


@dataclass
class Quarantine:
    """The quarantine list, streamed to its file (one {"key", "reason"} a line), and its counts."""

    handle: IO[str]
    count: int = 0
    kinds: Counter = field(default_factory=Counter)

    def add(self, entries: Iterable[dict[str, str]]) -> None:
        for entry in entries:
            self.handle.write(json.dumps({"key": entry["key"], "reason": entry["reason"]}, sort_keys=True) + "\n")
            self.count += 1
            self.kinds[reason_kind(entry["reason"])] += 1


def _device(name: str | None) -> Any:
    """`name` as a torch device; by default the stages' (a CUDA GPU when there is one, else the CPU)."""
    import torch

    from ssl_models.core.device import training_device

    if name is None:
        return training_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"embed --device {name!r}: not a device (cpu, cuda, cuda:1...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"embed --device {name}: no CUDA GPU here; leave --device out, or use cpu")
    return device


@dataclass
class Chunk:
    """A few sources read and preprocessed: their labeled rows, which record each row belongs to
    (its sha256), and the keys each record is written under (copies within the chunk share one)."""

    sources: int
    rows: list[dict[str, Any]]
    owners: list[str]  # per row, the sha256 of its record
    keys: dict[str, list[str]]  # sha256 -> keys, in the order the records were read
    quarantine: list[dict[str, str]]


def _embed_sources(target: Target, folder_cfg: DomainConfig, sources: dict[str, Source], public: Namer,
                   encoder: Encoder, batch_size: int, parquet_file: Path, quarantine: Quarantine,
                   prepare_ahead: bool) -> int:
    """Every source through preprocess and the encoder, chunk by chunk, into `parquet_file`;
    returns the rows written. With `prepare_ahead`, the next chunk is read and preprocessed in a
    background thread while this one is embedded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ssl_models.core.device import set_cpu_threads
    from tasks.probes import embed_rows

    cfg = target.cfg
    set_cpu_threads(cfg.cpu_threads)  # the block's one thread setting, as in fine-tuning's embedding
    import datasets

    datasets.disable_progress_bars()  # a bar per chunk's shard folder would bury embed's own
    schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32(), encoder.dim))],
                       metadata={f"ssl_pipeline.{k}": v for k, v in {**target.about, "dim": str(encoder.dim)}.items()})
    pending = iter(sources.items())
    rows_per_source, wanted_rows = 1.0, CHUNK_BATCHES * batch_size
    written = 0

    def chunks(workdir: Path) -> Iterator[Chunk]:
        for index in itertools.count():
            # whole sources, about `wanted_rows` rows: sized by the rows per source seen so far (a slide's tiles)
            batch = list(itertools.islice(pending, max(1, round(wanted_rows / rows_per_source))))
            if not batch:
                return
            yield _prepare(target, folder_cfg, batch, public, workdir / f"chunk-{index}")

    progress = tqdm(total=len(sources), desc=f"embed {cfg.name}", unit="source", disable=None)
    with tempfile.TemporaryDirectory(prefix="ssl-pipeline-embed-") as workdir, \
            ThreadPoolExecutor(1, thread_name_prefix="embed-read") as reader, \
            pq.ParquetWriter(parquet_file, schema) as writer, torch.inference_mode():
        prepared = chunks(Path(workdir))
        for chunk in _ahead(prepared, reader) if prepare_ahead else prepared:
            quarantine.add(chunk.quarantine)
            if chunk.rows:
                rows_per_source = max(1.0, len(chunk.rows) / chunk.sources)
                features = embed_rows(encoder, chunk.rows, batch_size, precision=cfg.finetune.precision)
                keys, vectors = _per_record(chunk, features)
                flat = pa.array(vectors.reshape(-1), type=pa.float32())
                writer.write_table(pa.table({"key": pa.array(keys, pa.string()),
                                             "embedding": pa.FixedSizeListArray.from_arrays(flat, encoder.dim)},
                                            schema=schema))
                written += len(keys)
            progress.update(chunk.sources)
        progress.close()
    return written


def _ahead(items: Iterator[Chunk], reader: ThreadPoolExecutor) -> Iterator[Chunk]:
    """`items`, the next one made in `reader`'s thread while the caller works on this one."""
    pending = reader.submit(next, items, None)
    while (item := pending.result()) is not None:
        pending = reader.submit(next, items, None)
        yield item


def _per_record(chunk: Chunk, features: np.ndarray) -> tuple[list[str], np.ndarray]:
    """One embedding per record (the mean of its rows' when preprocessing gave it several), written
    under each of its keys."""
    import numpy as np

    order: dict[str, list[int]] = {}
    for index, owner in enumerate(chunk.owners):
        order.setdefault(owner, []).append(index)
    keys, vectors = [], []
    for sha256, record_keys in chunk.keys.items():
        indices = order.get(sha256)
        if indices is None:
            continue  # quarantined by preprocess, or gave no row (listed in the chunk's quarantine)
        vector = features[indices[0]] if len(indices) == 1 else features[indices].mean(axis=0)
        keys.extend(record_keys)
        vectors.extend([vector] * len(record_keys))
    return keys, np.asarray(vectors, dtype=np.float32).reshape(len(keys), features.shape[1])


def _prepare(target: Target, folder_cfg: DomainConfig, sources: list[tuple[str, Source]], public: Namer,
             chunk_dir: Path) -> Chunk:
    """Read `sources` as ingest does (quarantining what fails), give preprocess their manifest rows,
    and read its `labeled` rows back; the chunk's temporary shards are deleted before returning."""
    domain = target.domain
    quarantine: list[dict[str, str]] = []
    manifest: list[dict[str, Any]] = []
    keys: dict[str, list[str]] = {}
    for source_key, source in sources:
        records, rejected = read_source(domain, source, folder_cfg)
        quarantine.extend({"key": public("key", item["key"]), "reason": item["reason"]} for item in rejected)
        for record in records:
            key = public("key", record.key)
            if record.sha256 in keys:  # an exact copy within the chunk: embedded once, written under each key
                keys[record.sha256].append(key)
                continue
            keys[record.sha256] = [key]
            manifest.append({"key": key, "source": source_key, "sha256": record.sha256, "bytes": record.n_bytes,
                             **record.meta, **NEUTRAL_ROW})
    if not manifest:
        return Chunk(len(sources), [], [], {}, quarantine)
    rows, failed = _preprocess(domain, folder_cfg, manifest, dict(sources), chunk_dir)
    quarantine.extend(failed)
    sha_of_key = {row["key"]: row["sha256"] for row in manifest}
    owners = [_owner(row, keys, sha_of_key, domain) for row in rows]
    placed = set(owners) | {sha_of_key[entry["key"]] for entry in failed if entry["key"] in sha_of_key}
    quarantine.extend({"key": key, "reason": "preprocessing gave no sample to embed"}
                      for sha256, record_keys in keys.items() if sha256 not in placed for key in record_keys)
    for entry in failed:  # a record preprocess quarantined is quarantined under each of its keys
        sha256 = sha_of_key.get(entry["key"])
        quarantine.extend({"key": key, "reason": entry["reason"]} for key in keys.get(sha256, [])[1:])
    return Chunk(len(sources), rows, owners, keys, quarantine)


def _preprocess(domain: Domain, folder_cfg: DomainConfig, manifest: list[dict[str, Any]],
                located: dict[str, Source], chunk_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The `labeled` rows `domain.preprocess` makes of `manifest`, and what it quarantined. Where it
    fails outright on a file that read well (a library error deep in a transform), each source is
    preprocessed alone and the failing one quarantined with the error: one bad file never costs the
    others their embeddings. A `PipelineError` (the settings, not a file) stops the command."""
    chunk_dir.mkdir()
    try:
        summary = domain.preprocess(folder_cfg, manifest, chunk_dir, lambda row: located[row["source"]])
        return _labeled_rows(chunk_dir / LABELED), summary.get("quarantine", [])
    except PipelineError:
        raise
    except Exception as error:  # noqa: BLE001 - a file's failure becomes its quarantine reason
        failure = error
    finally:
        shutil.rmtree(chunk_dir, ignore_errors=True)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in manifest:
        by_source.setdefault(row["source"], []).append(row)
    if len(by_source) == 1:
        paths = located[manifest[0]["source"]].paths
        reason = f"preprocessing failed: {type(failure).__name__}: {without_names(str(failure), paths)[:200]}"
        return [], [{"key": row["key"], "reason": reason} for row in manifest]
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for index, source_rows in enumerate(by_source.values()):
        source_dir = chunk_dir.with_name(f"{chunk_dir.name}-{index}")
        more_rows, more_failed = _preprocess(domain, folder_cfg, source_rows, located, source_dir)
        rows += more_rows
        failed += more_failed
    return rows, failed


def _owner(row: dict[str, Any], keys: dict[str, list[str]], sha_of_key: dict[str, str], domain: Domain) -> str:
    """The record a `labeled` row was made from: its `sample_id` is the record's sha256, or (a tile)
    its `source` column names the record's key."""
    if row.get("sample_id") in keys:
        return row["sample_id"]
    if row.get("source") in sha_of_key:
        return sha_of_key[row["source"]]
    raise RuntimeError(f"{domain.name}'s preprocess wrote a labeled row whose sample_id is no record's sha256 "
                       "and whose source column names no record: embed cannot tell whose embedding it is")


def _labeled_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of a `labeled` shard ([] when preprocess wrote none: datasets writes no table file then)."""
    if not any(folder.glob("*.arrow")):
        return []
    from datasets import load_from_disk

    return load_from_disk(str(folder)).to_list()


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """The keys and embeddings [n, dim] of a file `embed` wrote."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return table.column("key").to_pylist(), np.asarray(column.values, dtype=np.float32).reshape(-1, dim)

