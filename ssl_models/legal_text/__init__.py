"""Legal text: readers, a domain tokenizer, BERT-style backbones and masked-language modelling."""

from __future__ import annotations

import contextlib
import os
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain, Locate, Record, Rejected, Source, rows_by_source
from ssl_models.core.errors import PipelineError
from ssl_models.legal_text.config import BACKBONES, METHODS, SECTIONS
from ssl_models.legal_text.default_data import ATTRIBUTION, write_licensedcode_corpus
from ssl_models.legal_text.readers import TEXT_SUFFIXES, read_text_file

if TYPE_CHECKING:
    from ssl_models.core.modules import Encoder


@contextlib.contextmanager
def tokenizer_threads() -> Iterator[None]:
    """`tokenizers`' own thread pool (Rust, rayon: every core, or RAYON_NUM_THREADS) on while the
    vocabulary is trained and the texts tokenised; off everywhere else (the offline settings), where
    DataLoader workers fork after it. The vocabulary and the ids do not depend on it (tested)."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = before


PARALLELISM = "TOKENIZERS_PARALLELISM"


class SpilledTexts:
    """The manifest's texts, read from the corpus once, written to a scratch file and read back by
    row number (their order in the manifest) in any order as often as needed: preprocess holds two
    integers a row, not the texts (a firm's store of a million documents would not fit in memory).
    The file lies in the stage's output folder while it is being made (private as the shards,
    which carry the labeled texts) and is removed before that folder is put in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets, self.sizes = array("Q"), array("Q")  # row number -> where its text lies in the file
        self.handle: Any = None

    def __enter__(self) -> SpilledTexts:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()
        self.path.unlink(missing_ok=True)

    def write(self, texts: Iterable[str]) -> None:
        """The texts of rows 0, 1, 2... in that order."""
        with open(self.path, "wb") as out:
            for text in texts:
                data = text.encode("utf-8", "surrogatepass")
                self.offsets.append(out.tell())
                self.sizes.append(len(data))
                out.write(data)
        self.handle = open(self.path, "rb")

    def get(self, number: int) -> str:
        self.handle.seek(self.offsets[number])
        return self.handle.read(self.sizes[number]).decode("utf-8", "surrogatepass")

    def of(self, numbers: Sequence[int]) -> Iterable[str]:
        """The texts of rows `numbers` in their order, read again each time the result is iterated."""
        return _Reiterable(lambda: map(self.get, numbers))


@dataclass
class _Reiterable:
    """An iterable whose every iteration is a fresh `make()`."""

    make: Callable[[], Iterator[Any]]

    def __iter__(self) -> Iterator[Any]:
        return self.make()


class LegalText(Domain, module="legal_text"):
    default_method = "mlm"
    name, suffixes, sections, methods, backbones = "legal_text", TEXT_SUFFIXES, SECTIONS, METHODS, BACKBONES
    baseline = "ssl_models.legal_text.baseline"
    reads_taken_bytes = 16 * 2 ** 20  # a document is read once at ingest: for its digest and its text
    # a short text is read, hashed and decoded in tens of microseconds: a chunk of 256 was about 10 ms
    # of a worker's time, and with 2 workers on 2 cores about 1.8 cores were busy (1.95 with 1,024)
    ingest_chunk_items = 1024

    def validate(self, cfg: DomainConfig) -> None:
        if (cfg.preprocess.tokenizer == "base") != bool(cfg.model.base_checkpoint):
            raise PipelineError(f"params.yaml domains.{cfg.name}: preprocess.tokenizer: base goes with "
                                "model.base_checkpoint (the checkpoint's vocabulary), tokenizer: train with a "
                                "model from scratch")
        if getattr(cfg.pretrain.options, "distill_weight", 0) > 0 and not cfg.model.base_checkpoint:
            raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.options.distill_weight: distillation keeps "
                                "the continued model close to model.base_checkpoint; set one, or distill_weight: 0")

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        ingest = cfg.ingest
        yield from read_text_file(source.paths[0], source.key, ingest.text_field, ingest.fallback_encoding,
                                  ingest.min_characters, ingest.max_characters)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        counts = write_licensedcode_corpus(out_dir, cfg.default_data.max_files)
        return counts

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Locate) -> dict[str, Any]:
        from datasets import Features, List, Value

        from ssl_models.core.shards import LABELED, PRETRAIN_PARTS, ShardWriter
        from ssl_models.legal_text.shards import build_tokenizer, iter_blocks, normalised_text_hash

        options = cfg.preprocess
        labeled_columns = ("sample_id", "text", "label", "split", "group")
        pretrain = Features({"input_ids": List(Value("int32"))})
        with SpilledTexts(out_dir / ".texts") as texts, ShardWriter(
                out_dir, pretrain, Features(dict.fromkeys(labeled_columns, Value("string")))) as shards:
            texts.write(self._read_texts(cfg, manifest, locate))
            by_split: dict[str, array] = defaultdict(lambda: array("Q"))  # row numbers: 8 bytes a row
            labeled: list[tuple[int, dict[str, Any]]] = []
            for number, row in enumerate(manifest):
                by_split[row["split"]].append(number)
                if row.get("label") is not None:
                    labeled.append((number, row))
            summary: dict[str, Any] = {"tokenizer": options.tokenizer}
            with tokenizer_threads():
                tokenizer = build_tokenizer(cfg, texts.of(by_split["train"]))
                tokenizer.save_pretrained(out_dir / "tokenizer")
                summary["vocab_size"] = len(tokenizer)
                for split, part in PRETRAIN_PARTS.items():  # the blocks written as each batch of texts fills them
                    summary[f"pretrain_{split}_blocks"] = summary[f"pretrain_{split}_tokens"] = 0
                    for blocks in iter_blocks(tokenizer, texts.of(by_split[split]), options.block_size):
                        shards.add_columns(part, {"input_ids": blocks})
                        summary[f"pretrain_{split}_blocks"] += int(blocks.shape[0])
                        summary[f"pretrain_{split}_tokens"] += int(blocks.size)
            # the labeled test texts' hashes (a few) looked for among the train texts', not the train
            # texts' hashes kept (a million of them); without training rows (embed's chunks) none is hashed
            tests = [normalised_text_hash(texts.get(n)) for n, r in labeled if r["split"] == "test"] \
                if by_split["train"] else []
            found: set[str] = set()
            if tests:
                wanted = set(tests)
                found = {h for h in map(normalised_text_hash, texts.of(by_split["train"])) if h in wanted}
            summary["labeled_test_near_copies_in_pretraining"] = sum(h in found for h in tests)
            for number, row in labeled:
                shards.add(LABELED, {"sample_id": row["sha256"], "text": texts.get(number), "label": str(row["label"]),
                                     "split": row["split"], "group": str(row.get("group") or row["sha256"])})
            shards.close()
        return summary

    def _read_texts(self, cfg: DomainConfig, manifest: Iterable[dict[str, Any]], locate: Locate) -> Iterator[str]:
        """The text of every row, in the manifest's order, source by source (ingest wrote a source's
        rows one after another): a JSONL file is read once for all its records, and only one
        source's rows are held at a time."""
        for source, rows in rows_by_source(manifest, locate):
            by_hash = {record.sha256: record.content for record in self.read(source, cfg)
                       if isinstance(record, Record)}
            for row in rows:
                yield by_hash[row["sha256"]]

    def load_pretrained(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        from ssl_models.legal_text.backbones import load_text_encoder

        return load_text_encoder(pretrained_dir, cfg)

    def build_scratch(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """The pretrained encoder's architecture and tokenizer, random weights."""
        from ssl_models.legal_text.backbones import load_text_encoder

        return load_text_encoder(pretrained_dir, cfg, weights=False)

    def export(self, cfg: DomainConfig, encoder: Encoder, out_dir: Path) -> dict[str, Any]:
        """A Hugging Face folder (`AutoModel`, `AutoTokenizer`; sentence-transformers' pooling files
        where the pooling is not the plain mean) and `embedding.json`: how a document's windows
        are cut and pooled (the snippet reproduces it with transformers alone)."""
        import json

        from ssl_models.legal_text.backbones import CHARS_PER_TOKEN, EXPORT_SNIPPET

        encoder.save(out_dir)  # the base model as loaded (BERT's unused pooler included: a strict load)
        settings = {"max_length": encoder.max_length, "max_document_tokens": encoder.max_document_tokens,
                    "chars_per_token": CHARS_PER_TOKEN, "pooling": encoder.pooling.mode,
                    "normalize": encoder.pooling.normalize}
        (out_dir / "embedding.json").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return {"library": "transformers", "format": "a Hugging Face model folder (AutoModel, AutoTokenizer)",
                "snippet": EXPORT_SNIPPET, "inputs": "a list of document texts (str)"}

    def load_export(self, cfg: DomainConfig, folder: Path) -> Encoder:
        """The folder `export` wrote with `Encoder.save`: the model (strictly), its tokenizer and pooling."""
        from ssl_models.legal_text.backbones import load_text_encoder

        return load_text_encoder(folder, cfg, strict=True)

    def build_generic(self, cfg: DomainConfig, shards_dir: Path) -> Encoder:
        """The generic checkpoint as published, with its own tokenizer and pooling."""
        from ssl_models.legal_text.backbones import load_text_encoder, resolve_checkpoint

        return load_text_encoder(resolve_checkpoint(cfg), cfg)

    # the report's sentence on what the labeled task is
    task_kind = "document classification"
    default_task = ("license-text classification into ScanCode license categories (Permissive, Copyleft, "
                    "Proprietary Free, ...). " + ATTRIBUTION)
