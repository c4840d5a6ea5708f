"""Settings of the legal domain's params.yaml sections, its methods' options, and its registries.

Kept free of torch and transformers so every stage validates the whole block in milliseconds.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ssl_models.core.config import IngestLimits, require
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ssl_models.core.config import DomainConfig
    from ssl_models.core.modules import Encoder, PretrainMethod


@dataclass
class MLMOptions:
    """`pretrain.options` of `mlm`: the share of (non-special) tokens each block predicts."""

    mlm_probability: float = 0.15
    # weight of the self-distillation term (0: off): the mean squared difference between the final
    # hidden states of the model being pretrained and of the frozen base checkpoint it started from,
    # on the same masked blocks; keeps continued pretraining close to the generic model (needs
    # model.base_checkpoint)
    distill_weight: float = 0.0

    def validate(self, where: str) -> None:
        require(0 < self.mlm_probability < 1, f"{where}.mlm_probability", "must be in (0, 1)")
        require(self.distill_weight >= 0, f"{where}.distill_weight", "must be >= 0 (0: no self-distillation)")


@dataclass
class MLMSpanContrastOptions(MLMOptions):
    """`pretrain.options` of `mlm_span_contrastive`: MLM plus NT-Xent between adjacent spans."""

    contrastive_weight: float = 1.0  # of the contrastive term against the MLM loss
    temperature: float = 0.1  # of NT-Xent's softmax over cosine similarities

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.contrastive_weight >= 0, f"{where}.contrastive_weight", "must be >= 0")
        require(self.temperature > 0, f"{where}.temperature", "must be positive")




def _is_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


@dataclass
class TextIngestConfig(IngestLimits):
    """`ingest:` block."""

    text_field: str = "text"  # field holding the text in .jsonl records
    fallback_encoding: str = "latin-1"  # used when UTF-8 fails and detection finds nothing
    min_characters: int = 1
    # characters of one document (a file's text, a .jsonl record's field), counted after decoding:
    # a longer one is quarantined with its size (a 200 MB single-line text once took preprocess's
    # tokenizer past 6 GB). 10 million characters is some 4,000 pages; files stay under 256 MiB
    max_characters: int = 10_000_000

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.max_characters >= self.min_characters, f"{where}.max_characters",
                f"must be at least min_characters ({self.min_characters})")
        require(_is_encoding(self.fallback_encoding), f"{where}.fallback_encoding",
                f"unknown encoding {self.fallback_encoding!r}")
        require(self.min_characters >= 1, f"{where}.min_characters", "must be at least 1")


@dataclass
class LicensedcodeDefaultConfig:
    """`default_data:` block: how much of the embedded corpus to lay out (all by default)."""

    max_files: int | None = None

    def validate(self, where: str) -> None:
        require(self.max_files is None or self.max_files > 0, f"{where}.max_files", "must be positive or null")


@dataclass
class TextPreprocessConfig:
    """`preprocess:` block."""

    tokenizer: Literal["train", "base"] = "train"  # train: WordPiece learned on the corpus; base: the checkpoint's
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = True
    block_size: int = 128  # tokens per pretraining block
    # with tokenizer: base, up to this many of the training split's most frequent whole words that the
    # base vocabulary cuts into several pieces become tokens of their own (0: the base vocabulary as is);
    # their embeddings start as the mean of their pieces'
    extend_vocabulary: int = 0
    extend_min_frequency: int = 20  # occurrences in the training split a word needs to be added

    def validate(self, where: str) -> None:
        require(self.vocab_size >= 16, f"{where}.vocab_size", "must be at least 16 (5 special tokens and an alphabet)")
        require(self.min_frequency >= 1, f"{where}.min_frequency", "must be at least 1")
        require(self.block_size >= 8, f"{where}.block_size", "must be at least 8")
        require(self.extend_vocabulary >= 0, f"{where}.extend_vocabulary", "must be >= 0 (0: no new words)")
        require(self.extend_min_frequency >= 1, f"{where}.extend_min_frequency", "must be at least 1")
        require(self.extend_vocabulary == 0 or self.tokenizer == "base", f"{where}.extend_vocabulary",
                "extends the base checkpoint's vocabulary: set tokenizer: base (a trained tokenizer "
                "already learns the corpus' words)")


@dataclass
class TextModelConfig:
    """`model:` block."""

    backbone: Literal["bert"] = "bert"  # a BERT-style transformers encoder
    base_checkpoint: str | None = None  # local Hugging Face folder, or package:<module>/<subdir>
    hidden_size: int = 128  # the BERT trained from scratch when there is no base checkpoint
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    dropout: float = 0.1  # its hidden and attention dropout (BERT's 0.1); a base checkpoint keeps its own
    max_length: int = 128  # tokens per window of a labeled text, for probes and fine-tuning
    # a longer labeled text is cut into windows of max_length whose embeddings are mean-pooled,
    # up to this many tokens (max_length: one window, the text cut there)
    max_document_tokens: int = 512

    def validate(self, where: str) -> None:
        require(self.max_document_tokens >= self.max_length, f"{where}.max_document_tokens",
                f"must be at least max_length ({self.max_length})")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            require(getattr(self, name) > 0, f"{where}.{name}", "must be positive")
        require(0 <= self.dropout < 1, f"{where}.dropout", "must be in [0, 1)")
        require(self.hidden_size % self.num_heads == 0, f"{where}.hidden_size",
                f"must be divisible by num_heads ({self.num_heads})")


# The domain's params.yaml sections, each parsed and checked by `load_config` before any stage runs.
SECTIONS = {"ingest": TextIngestConfig, "preprocess": TextPreprocessConfig, "model": TextModelConfig,
            "default_data": LicensedcodeDefaultConfig}

METHODS: Registry[type[PretrainMethod]] = Registry("text SSL method")
METHODS.register_lazy("mlm", "ssl_models.legal_text.methods:MaskedLanguageModeling", options=MLMOptions)
METHODS.register_lazy("mlm_span_contrastive", "ssl_models.legal_text.methods:MaskedLanguageModelingWithSpanContrast",
                      options=MLMSpanContrastOptions)
BACKBONES: Registry[Callable[[DomainConfig, Path], Encoder]] = Registry("text backbone")
BACKBONES.register_lazy("bert", "ssl_models.legal_text.backbones:build_bert")
