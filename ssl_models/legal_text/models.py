"""The text encoder (a BERT-style transformers model), BERT's token masking, and the
masked-language-modelling methods."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, Encoder, PretrainMethod, generator
from ssl_models.legal_text.config import MLMOptions, MLMSpanContrastOptions

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()  # loading a small checkpoint takes milliseconds

CHARS_PER_TOKEN = 12
IGNORE_INDEX = -100  # label of positions without loss (cross_entropy's default ignore_index)


def resolve_checkpoint(cfg: DomainConfig) -> Path:
    """`model.base_checkpoint` on disk: a folder (relative to the project root), or
    `package:<importable module>/<subdir>` for weights shipped in a package."""
    reference = cfg.model.base_checkpoint
    if reference.startswith("package:"):
        module, _, subdir = reference[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(f"base_checkpoint {reference!r}: package {module!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / subdir
    else:
        path = cfg.resolve(reference)
    if not (path / "config.json").exists():
        raise PipelineError(f"base_checkpoint {reference!r}: no Hugging Face model folder "
                            f"(config.json) at {path}")
    return path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextEncoder(Encoder):
    """A transformers base model with mean pooling over the attention mask.

    `masked_lm_head` is the MLM head of the masked LM the encoder was cut from, for the method
    that pretrains it; it is not part of the encoder (neither saved with it nor in its
    parameters), and None for encoders loaded to fine-tune."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 masked_lm_head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        self.__dict__["masked_lm_head"] = masked_lm_head  # in __dict__: not registered as a submodule

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

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token features [batch, length, dim] of packed blocks (no padding, so no attention mask)."""
        return self.model(input_ids=input_ids).last_hidden_state

    def save(self, out_dir: Path) -> None:
        """A folder that `AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` read."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def build_bert(cfg: DomainConfig, shards_dir: Path) -> TextEncoder:
    """Backbone `bert`: `model.base_checkpoint`'s masked LM, or a BERT from scratch sized by
    the model section, cut into the encoder and its MLM head (the output projection stays
    tied to the input embeddings, as in BERT)."""
    tokenizer = AutoTokenizer.from_pretrained(shards_dir / "tokenizer")
    model_cfg = cfg.model
    if model_cfg.base_checkpoint:
        masked_lm = AutoModelForMaskedLM.from_pretrained(resolve_checkpoint(cfg))
        if masked_lm.config.vocab_size < len(tokenizer):
            raise PipelineError("the base checkpoint's vocabulary is smaller than the tokenizer's; with "
                                "model.base_checkpoint set, use preprocess.tokenizer: base")
    else:
        masked_lm = BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads, intermediate_size=model_cfg.intermediate_size,
            max_position_embeddings=max(512, model_cfg.max_length, cfg.preprocess.block_size),
            hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout,
            pad_token_id=tokenizer.pad_token_id))
    heads = [module for name, module in masked_lm.named_children() if name != masked_lm.base_model_prefix]
    if len(heads) != 1:
        raise PipelineError(f"backbone bert needs a BERT-style masked LM (a base model and one MLM head); "
                            f"the base checkpoint is a {type(masked_lm).__name__}")
    return TextEncoder(masked_lm.base_model, tokenizer, model_cfg.max_length, masked_lm_head=heads[0])


def load_text_encoder(init: str, cfg: DomainConfig, pretrained_dir: Path, seed: int) -> TextEncoder:
    """ssl: the domain-pretrained encoder; scratch: its architecture, randomly initialised from
    `seed`; generic: the base checkpoint as published."""
    if init not in ("ssl", "scratch", "generic"):
        raise PipelineError(f"unknown init {init!r}")
    if init == "generic" and not cfg.model.base_checkpoint:
        raise PipelineError("init `generic` needs model.base_checkpoint in params.yaml")
    source = resolve_checkpoint(cfg) if init == "generic" else pretrained_dir
    # transformers initialises from the global generator: the scratch weights, and any head a
    # checkpoint lacks (BERT's pooler after MLM pretraining), come from `seed`, not from the run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (AutoModel.from_config(AutoConfig.from_pretrained(source)) if init == "scratch"
                 else AutoModel.from_pretrained(source))
    return TextEncoder(model, AutoTokenizer.from_pretrained(source), cfg.model.max_length)


@dataclass
class MaskedTokens(DataSide):
    """BERT's masking of packed token blocks (Devlin et al., NAACL 2019), sample by sample:
    each non-special token is chosen with `mlm_probability` (at least one per block, so no
    block is without loss); of the chosen, 80% become [MASK], 10% a random token, 10% stay.

    Batch: `input_ids` (masked), `labels` (the original id at chosen positions, -100 elsewhere)
    and, with `clean_ids`, `clean_input_ids` (the blocks unmasked). Blocks have the fixed
    `preprocess.block_size`, so a batch is the concatenation of its samples."""

    special_ids: tuple[int, ...]  # never chosen ([CLS], [SEP], [PAD], ...)
    mask_id: int
    vocab_size: int
    mlm_probability: float
    clean_ids: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, mlm_probability: float,
                      clean_ids: bool = False) -> MaskedTokens:
        return cls(tuple(sorted(tokenizer.all_special_ids)), int(tokenizer.mask_token_id), len(tokenizer),
                   mlm_probability, clean_ids)

    def mask(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels) of one block, every draw from `seed`."""
        draws = generator(seed)
        maskable = ~torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype))
        chosen = (torch.rand(ids.shape, generator=draws) < self.mlm_probability) & maskable
        if not chosen.any() and maskable.any():  # one prediction at least: no block (or batch of one) without loss
            chosen[torch.multinomial(maskable.float(), 1, generator=draws)] = True
        action = torch.rand(ids.shape, generator=draws)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=draws, dtype=ids.dtype)
        masked = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
        return masked, torch.where(chosen, ids, IGNORE_INDEX)

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        clean = torch.as_tensor([row["input_ids"] for row in rows], dtype=torch.long)
        masked, labels = zip(*(self.mask(ids, seed) for ids, seed in zip(clean, seeds)))
        batch = {"input_ids": torch.stack(masked), "labels": torch.stack(labels)}
        if self.clean_ids:
            batch["clean_input_ids"] = clean
        return batch


class MaskedLanguageModeling(PretrainMethod):
    """Masked language modelling (Devlin et al., "BERT", NAACL 2019): predict the tokens that
    `MaskedTokens` hid, scoring only the masked positions (the vocabulary projection dominates
    the cost of a small BERT, and unmasked positions carry no loss).

    Usage: `loss = method(method.data_side()(rows, seeds))` where rows hold packed `input_ids`.
    """

    def __init__(self, encoder: TextEncoder, options: MLMOptions) -> None:
        super().__init__(encoder, options)
        if encoder.masked_lm_head is None:
            raise PipelineError("masked language modelling needs an encoder built by a backbone (with its MLM head)")
        self.head = encoder.masked_lm_head

    def data_side(self) -> MaskedTokens:
        return MaskedTokens.for_tokenizer(self.backbone_encoder.tokenizer, self.options.mlm_probability)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        hidden = self.backbone_encoder.hidden_states(batch["input_ids"])
        masked = labels != IGNORE_INDEX
        # the mean over the masked tokens of every process' blocks (their number varies by block)
        summed = nn.functional.cross_entropy(self.head(hidden[masked]), labels[masked], reduction="sum")
        return distributed.global_mean(summed, masked.sum())

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        input_ids = torch.as_tensor([s["input_ids"] for s in samples])
        return self.backbone_encoder.hidden_states(input_ids).mean(dim=1)


class MaskedLanguageModelingWithSpanContrast(MaskedLanguageModeling):
    """Masked language modelling plus a contrastive term that pulls together the pooled
    embeddings of two adjacent spans of the same text and pushes apart the other spans of the
    batch (NT-Xent). After DeCLUTR: Giorgi et al., "Deep Contrastive Learning for Unsupervised
    Textual Representations", ACL 2021, which pairs MLM with span contrast from one document.

    The contrastive term trains the pooled embedding that probes and fine-tuning use, so it
    pays off after few steps, where MLM alone mostly learns token frequencies. Uses lightly's
    NTXentLoss, which gathers the spans of every process (its negatives are the global batch's:
    the loss, not the data side, is batch-level).
    """

    def __init__(self, encoder: TextEncoder, options: MLMSpanContrastOptions) -> None:
        super().__init__(encoder, options)
        from lightly.loss import NTXentLoss

        self.contrastive_loss = NTXentLoss(temperature=options.temperature, gather_distributed=True)

    def data_side(self) -> MaskedTokens:
        return MaskedTokens.for_tokenizer(self.backbone_encoder.tokenizer, self.options.mlm_probability,
                                          clean_ids=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = batch["clean_input_ids"]
        half = clean.shape[1] // 2
        first = self.backbone_encoder.hidden_states(clean[:, :half]).mean(dim=1)
        second = self.backbone_encoder.hidden_states(clean[:, half:]).mean(dim=1)
        return super().forward(batch) + self.options.contrastive_weight * self.contrastive_loss(first, second)
