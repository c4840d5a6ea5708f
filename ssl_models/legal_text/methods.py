"""The masked-language-modelling methods, each a `PretrainMethod(encoder, options)` with
`forward(batch) -> loss`; their masks are built by the data side in `views.py`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ssl_models.core import distributed
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod
from ssl_models.legal_text.backbones import TextEncoder
from ssl_models.legal_text.config import MLMOptions, MLMSpanContrastOptions
from ssl_models.legal_text.views import IGNORE_INDEX, MaskedTokens


class MaskedLanguageModeling(PretrainMethod):
    """Masked language modelling (Devlin et al., "BERT", NAACL 2019): predict the tokens that
    `MaskedTokens` hid, scoring only the masked positions (the vocabulary projection dominates
    the cost of a small BERT, and unmasked positions carry no loss).

    With `distill_weight` > 0, continued pretraining is self-distilled: a frozen copy of the base
    checkpoint's model (the teacher) reads the same masked blocks, and the mean squared difference
    of the final hidden states, per token and unit, is added with that weight (after Lee et al.,
    "Self-Distillation for Further Pre-training of Transformers", 2022, whose further-pretrained
    model is regularised towards a teacher's representations; here the teacher is the generic
    model itself, which keeps the continued model close to it). The teacher is the encoder's
    model as built, before any step or resume: the base checkpoint's weights (with an extended
    vocabulary, its new rows as initialised, so it reads the same token ids). It is not a
    registered submodule: no parameter of the optimizer, DDP or FSDP, no key of a checkpoint or
    saved encoder; it follows the method's moves between devices and dtypes.

    Usage: `loss = method(method.data_side()(rows, seeds))` where rows hold packed `input_ids`.
    """

    def __init__(self, encoder: TextEncoder, options: MLMOptions) -> None:
        super().__init__(encoder, options)
        if encoder.masked_lm_head is None:
            raise PipelineError("masked language modelling needs an encoder built by a backbone (with its MLM head)")
        self.head = encoder.masked_lm_head
        teacher = None
        if options.distill_weight > 0:
            if not encoder.continues_checkpoint:
                raise PipelineError("pretrain.options.distill_weight keeps continued pretraining close to the base "
                                    "checkpoint: set model.base_checkpoint (and preprocess.tokenizer: base), or "
                                    "distill_weight: 0")
            teacher = copy.deepcopy(encoder.model).eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher  # in __dict__: not registered (see the class docstring)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> MaskedLanguageModeling:
        # `.to(device)`, `.cpu()`, `.float()` move the unregistered teacher with the method
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def data_side(self) -> MaskedTokens:
        return MaskedTokens.for_tokenizer(self.backbone_encoder.tokenizer, self.options.mlm_probability)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        hidden = self.backbone_encoder.hidden_states(batch["input_ids"])
        masked = labels != IGNORE_INDEX
        # the mean over the masked tokens of every process' blocks (their number varies by block)
        summed = nn.functional.cross_entropy(self.head(hidden[masked]), labels[masked], reduction="sum")
        loss = distributed.global_mean(summed, masked.sum())
        if self.teacher is not None:
            loss = loss + self.options.distill_weight * self.distillation(batch["input_ids"], hidden)
        return loss

    def distillation(self, input_ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The self-distillation term: the squared difference between the student's final hidden
        states `hidden` (computed here when None) and the frozen teacher's on the same `input_ids`,
        averaged over every unit of every token of the global batch."""
        if hidden is None:
            hidden = self.backbone_encoder.hidden_states(input_ids)
        with torch.no_grad():
            target = self.teacher(input_ids=input_ids).last_hidden_state
        summed = (hidden.float() - target.float()).pow(2).sum()
        return distributed.global_mean(summed, hidden.shape[0] * hidden.shape[1] * hidden.shape[2])

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
