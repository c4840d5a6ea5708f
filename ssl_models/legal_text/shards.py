"""Tokenizer (domain-trained or the base model's) and packing of documents into fixed blocks."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import BertWordPieceTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ssl_models.core.config import DomainConfig
from ssl_models.legal_text.backbones import resolve_checkpoint
from ssl_models.legal_text.vocab import extend_vocabulary, ranked_words

SPECIAL_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}


def build_tokenizer(cfg: DomainConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """Train a WordPiece vocabulary on the training split, or load the base checkpoint's
    (`preprocess.tokenizer`; the domain's `validate` pairs `base` with a base checkpoint).

    The CaseHOLD study (Zheng et al., ICAIL 2021) found a legal vocabulary gave the largest
    gains of domain pretraining, hence training one is the default. With `base`, the training
    split's frequent words the base vocabulary splits are added to it (`preprocess.extend_vocabulary`).
    `train_texts` is iterated more than once (a list, or `SpilledTexts.of`)."""
    options = cfg.preprocess
    if options.tokenizer == "base":
        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(cfg))
        if options.extend_vocabulary:
            # in pieces, as pack_blocks tokenises: the counting trainer too holds a string's alignments at once
            extend_vocabulary(tokenizer, (piece for text in train_texts for piece in text_pieces(text)),
                              options.extend_vocabulary, options.extend_min_frequency)
        return tokenizer
    trainer = BertWordPieceTokenizer(lowercase=options.lowercase)
    # in pieces, as pack_blocks tokenises: the trainer too holds a whole string's alignments at once
    pieces = lambda: (piece for text in train_texts for piece in text_pieces(text))  # noqa: E731
    inner = continuing_pieces(trainer, pieces())  # numbered before the trainer starts (see there)
    trainer.train_from_iterator(pieces(), vocab_size=options.vocab_size, min_frequency=options.min_frequency,
                                special_tokens=[*SPECIAL_TOKENS.values(), *inner], show_progress=False)
    # the learned vocabulary in a tokenizer of its own: `inner` were given as special tokens only to
    # number them, they are ordinary pieces
    wordpiece = BertWordPieceTokenizer(vocab=deterministic_vocabulary(trainer.get_vocab()),
                                       lowercase=options.lowercase)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, model_max_length=options.block_size,
                                        **SPECIAL_TOKENS)
    # BERT's [CLS] text [SEP] around each labeled window, as around each pretraining block
    # (transformers 5 replaces the WordPiece tokenizer's own post-processor by one that adds nothing)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)])
    return tokenizer


def continuing_pieces(trainer: BertWordPieceTokenizer, texts: Iterable[str]) -> list[str]:
    """`##c` for every character c inside a word (not its first) of `texts`, in code-point order.

    The WordPiece trainer (tokenizers 0.23, huggingface/tokenizers#1794) numbers these pieces as
    it meets them in a hash map of the words, whose order changes from run to run, and breaks ties
    between merges of equal count by those numbers: the same texts gave another vocabulary each
    run (six runs, six vocabularies, on the 3,841 clauses of LexGLUE's unfair-ToS at the default
    settings). Given first, as special tokens, they are numbered in this order instead, which
    makes every tie break the same way. The words are those the trainer sees (its normaliser and
    pre-tokeniser) (`vocab.ranked_words`); a word's count does not matter here."""
    words = ranked_words(trainer.normalizer, trainer.pre_tokenizer, texts, min_frequency=0)
    return sorted({"##" + char for word in words for char in word[1:]})


def deterministic_vocabulary(learned: dict[str, int]) -> dict[str, int]:
    """The learned tokens numbered by token (special tokens first, in their places): the trainer
    numbers its alphabet in hash-map order, which differs between processes. WordPiece splits
    words by the vocabulary alone, so only the ids change."""
    specials = sorted((t for t in SPECIAL_TOKENS.values() if t in learned), key=learned.get)
    ordered = specials + sorted(t for t in learned if t not in SPECIAL_TOKENS.values())
    return {token: i for i, token in enumerate(ordered)}


# A fast tokenizer keeps some 20 bytes of alignment per character of the strings it is given at
# once: a 200 MB text took it past 6 GB (and aborted the process). It is given at most this many
# characters per call, long documents cut at whitespace into pieces of at most PIECE_CHARACTERS.
PIECE_CHARACTERS = 2 ** 20
BATCH_CHARACTERS = 2 ** 21


def text_pieces(text: str, limit: int | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters, each cut before a whitespace
    character (so the words, and the tokens, are those of the whole text), hard only in a run of
    `limit` characters without whitespace."""
    limit = limit or PIECE_CHARACTERS
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(text.rfind(space, start + 1, end + 1) for space in (" ", "\n", "\t"))
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def pack_blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int) -> np.ndarray:
    """Every block of `iter_blocks` in one int32 array [n_blocks, block_size]."""
    parts = list(iter_blocks(tokenizer, texts, block_size))
    return np.concatenate(parts) if parts else np.empty((0, block_size), dtype=np.int32)


def iter_blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int) -> Iterator[np.ndarray]:
    """Concatenate documents (separated by [SEP]) and cut into [CLS] ... [SEP] blocks, yielded as
    int32 arrays [n, block_size] as each tokenizer batch fills them; the last partial block is
    dropped. The tokenizer gets the documents in batches of bounded size, long ones in pieces
    (`text_pieces`): what is held is one batch's tokens, whatever the corpus."""
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    body = block_size - 2
    carry = np.zeros(0, dtype=np.int32)
    batch: list[str] = []
    ends: list[bool] = []  # whether each piece of the batch ends its document ([SEP] after it)
    size = 0

    def flush() -> np.ndarray:  # the batch's whole blocks; what is left over waits for the next batch
        nonlocal carry
        stream: list[int] = []
        for ids, last in zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends):
            stream.extend(ids)
            if last:
                stream.append(sep)
        batch.clear()
        ends.clear()
        segment = np.concatenate([carry, np.asarray(stream, dtype=np.int32)])
        whole = len(segment) // body
        blocks = np.empty((whole, block_size), dtype=np.int32)
        blocks[:, 0], blocks[:, -1] = cls, sep
        blocks[:, 1:-1] = segment[:whole * body].reshape(whole, body)
        carry = segment[whole * body:]
        return blocks

    for text in texts:
        pieces = list(text_pieces(text))
        for index, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(index == len(pieces) - 1)
            size += len(piece)
            if size >= BATCH_CHARACTERS:
                if len(blocks := flush()):
                    yield blocks
                size = 0
    if batch and len(blocks := flush()):
        yield blocks


def normalised_text_hash(text: str) -> str:
    """Hash of lower-cased text with whitespace collapsed: finds near-exact copies."""
    return hashlib.sha256(" ".join(re.findall(r"\w+", text.lower())).encode()).hexdigest()
