"""Text backbones (BERT-style, via transformers) and the masked-language-modelling method."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder, PretrainMethod
from ssl_models.legal_text.config import TEXT_METHODS, TextModelConfig

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # loading a small checkpoint takes milliseconds


def resolve_checkpoint(reference: str) -> Path:
    """A local folder, or `package:<importable module>/<subdir>` for weights shipped in a package."""
    if reference.startswith("package:"):
        module, _, subdir = reference[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(f"base_checkpoint {reference!r}: package {module!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / subdir
    else:
        path = Path(reference)
    if not (path / "config.json").exists():
        raise PipelineError(f"base_checkpoint {reference!r}: no Hugging Face model folder "
                            f"(config.json) at {path}")
    return path


CHARS_PER_TOKEN = 12


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextEncoder(Encoder):
    """A transformers encoder with mean pooling over the attention mask."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # A fast tokenizer tokenizes the whole text before truncating; licenses and contracts
        # run to 100k characters, so cut first (no token spans more than CHARS_PER_TOKEN chars
        # on average in any vocabulary we ship).
        texts = [s["text"][: self.max_length * CHARS_PER_TOKEN] for s in samples]
        encoded = self.tokenizer(texts, truncation=True,
                                 max_length=self.max_length, padding=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


@TEXT_METHODS.register("mlm")
class MaskedLanguageModeling(PretrainMethod):
    """Masked language modelling (Devlin et al., "BERT", NAACL 2019): predict 15% of tokens,
    80% of them replaced by [MASK], 10% by a random token, 10% kept.

    Usage: `loss = method(method.collate(rows))` where rows hold packed `input_ids` blocks.
    Masking draws from torch's global RNG, so a checkpoint of that state resumes exactly.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int, mlm_probability: float = 0.15) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collator([{"input_ids": s["input_ids"]} for s in samples])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if isinstance(self.model, BertForMaskedLM):
            # Score only the masked positions: the vocabulary projection dominates the cost
            # of a small BERT, and unmasked positions carry no loss.
            hidden = self.model.bert(input_ids=batch["input_ids"]).last_hidden_state
            masked = labels != -100
            logits = self.model.cls(hidden[masked])
            return torch.nn.functional.cross_entropy(logits, labels[masked])
        return self.model(input_ids=batch["input_ids"], labels=labels).loss

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        input_ids = torch.as_tensor([s["input_ids"] for s in samples])
        return self.model.base_model(input_ids=input_ids).last_hidden_state.mean(dim=1)


@TEXT_METHODS.register("mlm_span_contrastive")
class MaskedLanguageModelingWithSpanContrast(MaskedLanguageModeling):
    """Masked language modelling plus a contrastive term that pulls together the pooled
    embeddings of two adjacent spans of the same text and pushes apart the other spans of the
    batch (NT-Xent). After DeCLUTR: Giorgi et al., "Deep Contrastive Learning for Unsupervised
    Textual Representations", ACL 2021, which pairs MLM with span contrast from one document.

    The contrastive term trains the pooled embedding that probes and fine-tuning use, so it
    pays off after few steps, where MLM alone mostly learns token frequencies. Uses lightly's
    NTXentLoss, which gathers negatives across GPUs under DDP.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 mlm_probability: float = 0.15, contrastive_weight: float = 1.0, temperature: float = 0.1) -> None:
        super().__init__(model, tokenizer, max_length, mlm_probability)
        from lightly.loss import NTXentLoss

        self.contrastive_weight = contrastive_weight
        self.contrastive_loss = NTXentLoss(temperature=temperature, gather_distributed=True)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate(samples)
        batch["clean_input_ids"] = torch.as_tensor([s["input_ids"] for s in samples])
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = batch["clean_input_ids"]
        half = clean.shape[1] // 2
        first = self.model.base_model(input_ids=clean[:, :half]).last_hidden_state.mean(dim=1)
        second = self.model.base_model(input_ids=clean[:, half:]).last_hidden_state.mean(dim=1)
        return super().forward(batch) + self.contrastive_weight * self.contrastive_loss(first, second)


def build_masked_lm(model_cfg: TextModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The MLM backbone: the base checkpoint when one is set, else a small BERT from scratch."""
    if model_cfg.base_checkpoint:
        model = AutoModelForMaskedLM.from_pretrained(resolve_checkpoint(model_cfg.base_checkpoint))
        if model.config.vocab_size < len(tokenizer):
            raise PipelineError(
                "the base checkpoint's vocabulary is smaller than the tokenizer's; with "
                "model.base_checkpoint set, use preprocess.tokenizer: base")
        return model
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=model_cfg.hidden_size,
                        num_hidden_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_heads,
                        intermediate_size=model_cfg.intermediate_size,
                        max_position_embeddings=max(512, model_cfg.max_length),
                        pad_token_id=tokenizer.pad_token_id)
    return BertForMaskedLM(config)


def load_text_encoder(init: str, model_cfg: TextModelConfig, pretrained_dir: Path, seed: int) -> TextEncoder:
    """ssl: the domain-pretrained backbone; scratch: its architecture, random init from `seed`;
    generic: the base checkpoint as published."""
    from transformers import AutoConfig, AutoTokenizer

    if init == "generic":
        if not model_cfg.base_checkpoint:
            raise PipelineError("init `generic` needs model.base_checkpoint in params.yaml")
        source = resolve_checkpoint(model_cfg.base_checkpoint)
        model = AutoModel.from_pretrained(source)
    elif init == "ssl":
        source = pretrained_dir
        model = AutoModel.from_pretrained(source)
    elif init == "scratch":
        source = pretrained_dir
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    else:
        raise PipelineError(f"unknown init {init!r}")
    return TextEncoder(model, AutoTokenizer.from_pretrained(source), model_cfg.max_length)
