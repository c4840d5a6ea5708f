"""Legal text: readers, a domain tokenizer, BERT-style backbones and masked-language modelling."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ssl_models.core.config import DomainConfig, parse_section
from ssl_models.core.domain import DOMAINS, Domain, Record, Rejected, Source
from ssl_models.core.errors import PipelineError
from ssl_models.legal_text.config import (
    TEXT_METHODS,
    LicensedcodeDefaultConfig,
    TextIngestConfig,
    TextModelConfig,
    TextPreprocessConfig,
)
from ssl_models.legal_text.default_data import ATTRIBUTION, write_licensedcode_corpus
from ssl_models.legal_text.readers import TEXT_SUFFIXES, read_text_file

if TYPE_CHECKING:
    from datasets import Dataset

    from ssl_models.core.modules import Encoder, PretrainMethod

# Model code (torch, transformers, datasets) is imported by the methods that need it, so that
# default_data and ingest start in a second instead of eight.
log = logging.getLogger(__name__)


@DOMAINS.register("legal_text")
class LegalText(Domain):
    name = "legal_text"
    suffixes = TEXT_SUFFIXES

    def _model_cfg(self, cfg: DomainConfig) -> TextModelConfig:
        return parse_section(TextModelConfig, cfg.model, f"domains.{cfg.name}.model")

    def validate(self, cfg: DomainConfig) -> None:
        where = f"domains.{cfg.name}"
        parse_section(TextIngestConfig, cfg.ingest, f"{where}.ingest")
        preprocess = parse_section(TextPreprocessConfig, cfg.preprocess, f"{where}.preprocess")
        parse_section(LicensedcodeDefaultConfig, cfg.default_data, f"{where}.default_data")
        base = self._model_cfg(cfg).base_checkpoint
        if (preprocess.tokenizer == "base") != bool(base):
            raise PipelineError(f"params.yaml {where}: preprocess.tokenizer: base goes with model.base_checkpoint "
                                "(the checkpoint's vocabulary), tokenizer: train with a model from scratch")
        TEXT_METHODS.check(cfg.pretrain.method)

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        options = parse_section(TextIngestConfig, cfg.ingest, f"domains.{cfg.name}.ingest")
        yield from read_text_file(source.paths[0], source.key, options.text_field, options.fallback_encoding,
                                  options.min_characters)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> None:
        options = parse_section(LicensedcodeDefaultConfig, cfg.default_data, f"domains.{cfg.name}.default_data")
        counts = write_licensedcode_corpus(out_dir, options.max_files)
        log.info("default legal corpus: %(written)d license texts written", counts)

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Callable[[dict[str, Any]], Source]) -> dict[str, Any]:
        from datasets import Dataset

        from ssl_models.legal_text.preprocessing import build_tokenizer, normalised_text_hash, pack_blocks, save_blocks

        options = parse_section(TextPreprocessConfig, cfg.preprocess, f"domains.{cfg.name}.preprocess")
        model_cfg = self._model_cfg(cfg)
        texts = self._read_texts(cfg, manifest, locate)
        by_split: dict[str, list[str]] = defaultdict(list)
        for row in manifest:
            by_split[row["split"]].append(texts[row["key"]])
        tokenizer = build_tokenizer(options, model_cfg, by_split["train"])
        tokenizer.save_pretrained(out_dir / "tokenizer")
        summary: dict[str, Any] = {"tokenizer": options.tokenizer, "vocab_size": len(tokenizer)}
        for split in ("train", "val"):
            blocks = pack_blocks(tokenizer, by_split[split], options.block_size)
            save_blocks(blocks, out_dir / f"pretrain_{split}")
            summary[f"pretrain_{split}_blocks"] = int(blocks.shape[0])
            summary[f"pretrain_{split}_tokens"] = int(blocks.size)
        labeled = [row for row in manifest if row.get("label") is not None]
        pretrain_near_copies = {normalised_text_hash(texts[r["key"]]) for r in manifest if r["split"] == "train"}
        test_rows = [r for r in labeled if r["split"] == "test"]
        summary["labeled_test_near_copies_in_pretraining"] = sum(
            normalised_text_hash(texts[r["key"]]) in pretrain_near_copies for r in test_rows)
        Dataset.from_dict({
            "sample_id": [r["sha256"] for r in labeled],
            "text": [texts[r["key"]] for r in labeled],
            "label": [str(r["label"]) for r in labeled],
            "split": [r["split"] for r in labeled],
            "group": [str(r.get("group") or r["sha256"]) for r in labeled],
        }).save_to_disk(str(out_dir / "labeled"))
        return summary

    def _read_texts(self, cfg: DomainConfig, manifest: list[dict[str, Any]],
                    locate: Callable[[dict[str, Any]], Source]) -> dict[str, str]:
        """Manifest key -> text; a JSONL file is read once for all its records."""
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in manifest:
            by_source[row["source"]].append(row)
        texts: dict[str, str] = {}
        for rows in by_source.values():
            by_hash = {record.sha256: record.content for record in self.read(locate(rows[0]), cfg)
                       if isinstance(record, Record)}
            texts.update((row["key"], by_hash[row["sha256"]]) for row in rows)
        return texts

    def build_pretrain_method(self, cfg: DomainConfig, shards_dir: Path) -> PretrainMethod:
        from transformers import AutoTokenizer

        from ssl_models.legal_text.models import build_masked_lm

        model_cfg = self._model_cfg(cfg)
        tokenizer = AutoTokenizer.from_pretrained(shards_dir / "tokenizer")
        method_cls = TEXT_METHODS.get(cfg.pretrain.method)
        model = build_masked_lm(model_cfg, tokenizer)
        try:
            return method_cls(model, tokenizer, model_cfg.max_length, **cfg.pretrain.options)
        except TypeError as error:
            raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.options do not fit method "
                                f"{cfg.pretrain.method!r}: {error}") from None

    def pretrain_dataset(self, shards_dir: Path, split: str) -> Dataset:
        from datasets import load_from_disk

        return load_from_disk(str(shards_dir / f"pretrain_{split}"))

    def save_pretrained(self, method: PretrainMethod, out_dir: Path) -> None:
        method.model.save_pretrained(out_dir)
        method.tokenizer.save_pretrained(out_dir)

    def load_encoder(self, init: str, cfg: DomainConfig, shards_dir: Path,
                     pretrained_dir: Path, seed: int) -> Encoder:
        from ssl_models.legal_text.models import load_text_encoder

        return load_text_encoder(init, self._model_cfg(cfg), pretrained_dir, seed)

    def available_inits(self, cfg: DomainConfig) -> list[str]:
        return ["ssl", "scratch", "generic"] if self._model_cfg(cfg).base_checkpoint else ["ssl", "scratch"]

    def task_description(self, cfg: DomainConfig, uses_default_data: bool) -> str:
        if uses_default_data:
            return ("license-text classification into ScanCode license categories (Permissive, "
                    "Copyleft, Proprietary Free, ...). " + ATTRIBUTION)
        return f"document classification by the `label` column of {cfg.labels}"
