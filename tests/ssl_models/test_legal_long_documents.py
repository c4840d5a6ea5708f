"""Labeled texts longer than model.max_length: windows of max_length tokens, pooled by their tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ssl_models.core.config import DomainConfig, load_config
from ssl_models.legal_text.backbones import CHARS_PER_TOKEN, TextEncoder, build_bert, mean_pool
from ssl_models.legal_text.shards import build_tokenizer
from tasks.probes import embed_rows
from tests.conftest import tiny_params, write_params

MAX_LENGTH = 16
FILLER = ("permission is hereby granted free of charge to any person obtaining a copy of this software "
          "and associated documentation files to deal in the software without restriction ") * 2
COPYLEFT = "you must distribute the source code of derivative works under the same license copyleft"
PERMISSIVE = "you may use it in proprietary works without sharing the source of your changes"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[DomainConfig, Path]:
    """A tiny legal config and a shards folder holding a tokenizer trained on the texts below."""
    root = tmp_path_factory.mktemp("legal_windows")
    write_params(root, tiny_params(model={"max_length": MAX_LENGTH, "max_document_tokens": 8 * MAX_LENGTH}))
    cfg, _ = load_config("legal", root / "params.yaml")
    tokenizer = build_tokenizer(cfg, [FILLER, COPYLEFT, PERMISSIVE] * 20)
    tokenizer.save_pretrained(root / "shards" / "tokenizer")
    return cfg, root / "shards"


def encoder_for(cfg: DomainConfig, shards: Path, max_document_tokens: int) -> TextEncoder:
    """The same seeded weights for any max_document_tokens (it changes no parameter)."""
    torch.manual_seed(0)
    model = dataclasses.replace(cfg.model, max_document_tokens=max_document_tokens)
    return build_bert(dataclasses.replace(cfg, model=model), shards).eval()


def embed(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(encoder.collate([{"text": text} for text in texts]))


def old_cut(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """The embedding before windows: the text cut at max_length tokens, mean-pooled."""
    encoded = encoder.tokenizer([t[: encoder.max_length * CHARS_PER_TOKEN] for t in texts], truncation=True,
                                max_length=encoder.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    return mean_pool(hidden.last_hidden_state, encoded["attention_mask"])


def test_words_after_the_first_window_change_the_embedding(project) -> None:
    encoder = encoder_for(*project, max_document_tokens=8 * MAX_LENGTH)
    tokens = len(encoder.tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    label_tokens = len(encoder.tokenizer(COPYLEFT, add_special_tokens=False)["input_ids"])
    # the label words lie beyond the first two windows, inside the document's eight
    assert 2 * MAX_LENGTH < tokens and tokens + label_tokens < 8 * (MAX_LENGTH - 2)
    copyleft, permissive = embed(encoder, [FILLER + COPYLEFT, FILLER + PERMISSIVE])
    first_window_only = embed(encoder_for(*project, max_document_tokens=MAX_LENGTH), [FILLER + COPYLEFT])[0]
    assert not torch.allclose(copyleft, first_window_only, atol=1e-4)
    assert not torch.allclose(copyleft, permissive, atol=1e-4)


def test_a_short_text_embeds_as_before_alone_and_beside_long_ones(project) -> None:
    encoder = encoder_for(*project, max_document_tokens=8 * MAX_LENGTH)
    short = "permission is hereby granted"
    assert len(encoder.tokenizer(short)["input_ids"]) < MAX_LENGTH
    alone = embed(encoder, [short])
    assert torch.equal(alone, old_cut(encoder, [short]))
    beside_long = embed(encoder, [FILLER + COPYLEFT, short, FILLER])[1]
    assert torch.allclose(beside_long, alone[0], atol=1e-5)


def test_max_document_tokens_equal_to_max_length_is_the_old_cut(project) -> None:
    encoder = encoder_for(*project, max_document_tokens=MAX_LENGTH)
    texts = [FILLER + COPYLEFT, "short text", FILLER]
    batch = encoder.collate([{"text": t} for t in texts])
    assert batch["input_ids"].shape[0] == len(texts)  # one window each
    assert torch.equal(embed(encoder, texts), old_cut(encoder, texts))


def test_windows_hold_special_tokens_and_weigh_by_their_tokens(project) -> None:
    encoder = encoder_for(*project, max_document_tokens=4 * MAX_LENGTH + MAX_LENGTH // 2)  # 4 whole windows
    tokenizer = encoder.tokenizer
    medium = FILLER[: len(FILLER) // 3]  # a few windows, the last one partly filled
    batch = encoder.collate([{"text": FILLER * 2}, {"text": "short"}, {"text": medium}])
    ids, mask, weights = batch["input_ids"], batch["attention_mask"], batch["window_weights"]
    lengths = mask.sum(1)
    n_medium = -(-len(tokenizer(medium, add_special_tokens=False)["input_ids"]) // (MAX_LENGTH - 2))
    assert 1 < n_medium < 4
    assert (weights > 0).sum(1).tolist() == [4, 1, n_medium]  # the long text stops at 4 windows
    assert ids.shape == (4 + 1 + n_medium, MAX_LENGTH)
    for window, length in zip(ids, lengths):
        assert window[0] == tokenizer.cls_token_id and window[length - 1] == tokenizer.sep_token_id
    assert torch.allclose(weights.sum(1), torch.ones(3))
    medium_windows = weights[2, 5:]
    assert torch.allclose(medium_windows, lengths[5:].float() / lengths[5:].sum())
    assert medium_windows[-1] < medium_windows[0]  # the partly filled window counts less


def test_a_batch_is_one_forward_and_fine_tuning_reaches_every_window(project) -> None:
    encoder = encoder_for(*project, max_document_tokens=8 * MAX_LENGTH).train()
    calls = []
    encoder.model.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(1))
    batch = encoder.collate([{"text": FILLER + COPYLEFT}, {"text": FILLER + PERMISSIVE}])
    encoder(batch).pow(2).sum().backward()
    assert len(calls) == 1
    # a token only the fourth window holds receives gradient through the pooled embedding
    late = set(batch["input_ids"][3].tolist()) - set(batch["input_ids"][:3].flatten().tolist())
    late -= set(encoder.tokenizer.all_special_ids)
    assert late
    gradient = encoder.model.embeddings.word_embeddings.weight.grad
    assert all(gradient[token].abs().sum() > 0 for token in late)


@pytest.mark.parametrize("init", ["ssl", "scratch"])
def test_ssl_and_scratch_encoders_window_their_texts(project, tmp_path: Path, init: str) -> None:
    cfg, shards = project
    encoder_for(cfg, shards, cfg.model.max_document_tokens).save(tmp_path / "encoder")
    from ssl_models.core.domain import get_domain

    loaded = get_domain("legal_text").load_encoder(init, cfg, shards, tmp_path / "encoder", seed=0)
    assert loaded.windows_per_document == 8
    features = embed_rows(loaded, [{"text": FILLER + COPYLEFT}, {"text": "short"}, {"text": FILLER}], batch_size=2)
    assert features.shape == (3, 32) and not (features[0] == features[2]).all()


def test_cached_windows_give_the_tokenizers_own_batches_also_when_the_cache_fills(project, monkeypatch) -> None:
    """A text is tokenized once per encoder; the batches are the tokenizer's own (padding=True),
    and a full cache starts again without losing a text of the batch at hand."""
    import copy

    from ssl_models.legal_text import backbones

    monkeypatch.setattr(backbones, "WINDOW_CACHE_TEXTS", 4)
    cfg, shards = project
    encoder = encoder_for(cfg, shards, 4 * MAX_LENGTH)
    texts = [FILLER, COPYLEFT, PERMISSIVE, "", FILLER + COPYLEFT, "mit", PERMISSIVE + FILLER]
    for start, stop in ((0, 3), (1, 5), (2, 7), (0, 7), (3, 4)):  # hits beside misses; a batch past the size
        batch = texts[start:stop]
        encoded = encoder.tokenizer(batch, truncation=True, max_length=MAX_LENGTH, padding=True,
                                    return_overflowing_tokens=True, return_tensors="pt")
        document = encoded["overflow_to_sample_mapping"]
        _, counts = document.unique_consecutive(return_counts=True)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # each window's document's first
        kept = torch.arange(len(document)) - first < encoder.windows_per_document
        got = encoder.collate([{"text": t} for t in batch])
        assert torch.equal(got["input_ids"], encoded["input_ids"][kept])
        assert torch.equal(got["attention_mask"], encoded["attention_mask"][kept])
        assert len(encoder.window_cache) <= 4
    assert copy.deepcopy(encoder).window_cache is encoder.window_cache  # fine-tuning's copies share it
