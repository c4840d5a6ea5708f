"""Settings of the text domain's params.yaml sections, and its method registry.

Kept free of torch and transformers so every stage validates the whole block in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssl_models.core.errors import PipelineError
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from ssl_models.core.modules import PretrainMethod

TEXT_METHODS: Registry[type[PretrainMethod]] = Registry("text SSL method")
TEXT_METHODS.register_lazy("mlm", "ssl_models.legal_text.models:MaskedLanguageModeling")
TEXT_METHODS.register_lazy("mlm_span_contrastive", "ssl_models.legal_text.models:MaskedLanguageModelingWithSpanContrast")


@dataclass
class TextIngestConfig:
    """`ingest:` block of a text domain."""

    text_field: str = "text"  # field holding the text in .jsonl records
    fallback_encoding: str = "latin-1"  # used when UTF-8 fails and detection finds nothing
    min_characters: int = 1


@dataclass
class LicensedcodeDefaultConfig:
    """`default_data:` block: how much of the embedded corpus to lay out (all by default)."""

    max_files: int | None = None


@dataclass
class TextPreprocessConfig:
    """`preprocess:` block of a text domain."""

    tokenizer: str = "train"  # train: a WordPiece vocabulary learned on the corpus; base: the base model's
    vocab_size: int = 8000
    min_frequency: int = 2
    lowercase: bool = True
    block_size: int = 128  # tokens per pretraining block

    def validate(self, where: str) -> None:
        if self.tokenizer not in ("train", "base"):
            raise PipelineError(f"params.yaml {where}.tokenizer: {self.tokenizer!r} is not train or base")
        if self.block_size < 8:
            raise PipelineError(f"params.yaml {where}.block_size must be at least 8")


@dataclass
class TextModelConfig:
    """`model:` block of a text domain."""

    base_checkpoint: str | None = None  # local Hugging Face folder, or package:<module>/<subdir>
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 128  # tokens per labeled text for probes and fine-tuning

    def validate(self, where: str) -> None:
        if self.hidden_size % self.num_heads:
            raise PipelineError(f"params.yaml {where}: hidden_size must be divisible by num_heads")
