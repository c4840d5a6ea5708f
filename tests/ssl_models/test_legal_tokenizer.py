"""The domain-trained WordPiece vocabulary is the same every run (huggingface/tokenizers#1794: the
trainer breaks ties between merges by numbers it gives in hash-map order)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from ssl_models.core.config import load_config
from ssl_models.legal_text import tokenizer_threads
from ssl_models.legal_text.shards import SPECIAL_TOKENS, build_tokenizer, pack_blocks
from tests.conftest import tiny_params, write_params

WORDS = ("the lessee shall pay rent agreement term party notice clause liability indemnify warranty "
         "termination breach supplier deliver goods services confidential information court law").split()


def tied_texts(count: int = 300) -> list[str]:
    """Numbered documents of a few words: many merges of equal count. With tokenizers 0.23's own
    trainer, eight trainings on these gave eight different vocabularies."""
    rng = random.Random(0)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(8)) for i in range(count)]


def test_training_the_vocabulary_again_gives_the_same_tokenizer_files(tmp_path: Path) -> None:
    write_params(tmp_path, tiny_params(preprocess={"tokenizer": "train", "vocab_size": 150, "min_frequency": 2}))
    cfg, _ = load_config("legal", tmp_path / "params.yaml")
    texts = tied_texts()
    for run in range(4):
        build_tokenizer(cfg, texts).save_pretrained(tmp_path / f"run-{run}")
    first = tmp_path / "run-0"
    names = sorted(path.name for path in first.iterdir())
    assert "tokenizer.json" in names
    for run in range(1, 4):
        for name in names:
            assert (tmp_path / f"run-{run}" / name).read_bytes() == (first / name).read_bytes(), (run, name)


def test_the_pieces_numbered_first_are_ordinary_tokens_of_the_vocabulary(tmp_path: Path) -> None:
    """`##c` pieces go to the trainer as special tokens only to be numbered: the tokenizer it hands on
    has BERT's five special tokens, and the pieces split words as any other."""
    write_params(tmp_path, tiny_params(preprocess={"tokenizer": "train", "vocab_size": 150, "min_frequency": 2}))
    tokenizer = build_tokenizer(load_config("legal", tmp_path / "params.yaml")[0], tied_texts())
    assert sorted(tokenizer.all_special_tokens) == sorted(SPECIAL_TOKENS.values())
    assert sorted(str(token) for token in tokenizer.added_tokens_decoder.values()) == sorted(SPECIAL_TOKENS.values())
    vocabulary = tokenizer.get_vocab()
    assert len(vocabulary) == 150 and "##q" not in vocabulary  # no q inside a word of the texts
    assert tokenizer.tokenize("Document 1234. indemnify") == ["document", "1", "##2", "##3", "##4", ".", "indemnify"]
    assert "##e" not in tokenizer.tokenize("a ##e in the text")  # not matched as a token of its own
    assert tokenizer.decode(tokenizer("indemnify the lessee")["input_ids"], skip_special_tokens=True) == \
        "indemnify the lessee"


def test_tokenizers_threads_change_neither_the_vocabulary_nor_the_blocks(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Preprocess trains and tokenises with `tokenizers`' own threads on (`tokenizer_threads`)."""
    write_params(tmp_path, tiny_params(preprocess={"tokenizer": "train", "vocab_size": 150, "min_frequency": 2}))
    cfg, _ = load_config("legal", tmp_path / "params.yaml")
    texts = tied_texts(2000)
    made = []
    for parallel in ("false", "true"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
        tokenizer = build_tokenizer(cfg, texts)
        tokenizer.save_pretrained(tmp_path / parallel)
        made.append(((tmp_path / parallel / "tokenizer.json").read_bytes(), pack_blocks(tokenizer, texts, 32)))
    assert made[0][0] == made[1][0]
    assert made[0][1].shape[0] > 100 and np.array_equal(made[0][1], made[1][1])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with tokenizer_threads():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"  # off again for what forks after


def test_spilled_texts_read_back_by_key_as_often_as_asked_and_leave_no_file(tmp_path: Path) -> None:
    """Legal preprocess keeps an offset a row, not the texts: each is read back from a scratch file."""
    from ssl_models.legal_text import SpilledTexts

    texts = ["Clause 1 — the Lessee’s duties", "lone \ud800 surrogate from JSON", ""]
    with SpilledTexts(tmp_path / ".texts") as spilled:
        spilled.write(iter(texts))
        again = spilled.of([2, 0, 1, 0])
        assert list(again) == list(again) == [texts[2], texts[0], texts[1], texts[0]]
        assert spilled.get(1) == texts[1]
    assert not (tmp_path / ".texts").exists()
