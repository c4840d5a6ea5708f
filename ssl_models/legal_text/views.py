"""The data side of masked language modelling: BERT's token masking of packed blocks, a
picklable callable that loader workers run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ssl_models.core.modules import DataSide, generator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of positions without loss (cross_entropy's default ignore_index)


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
