"""Vocabulary extension for domain-adaptive pretraining: the training split's frequent whole
words that the base checkpoint's tokenizer cuts into several pieces become tokens of their own,
each new embedding starting as the mean of its pieces' embeddings in the base model.

A word the generic vocabulary splits into four pieces costs four positions and is learned as a
phrase; as one token it is one position. Its embedding starts as the mean of its pieces' (the
initialisation of Sachidananda et al., "Efficient Domain Adaptation of Language Models via
Adaptive Tokenization", 2021, and of Gee et al.'s "Fast Vocabulary Transfer", 2022), where the
base model already reads it, rather than at random.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ssl_models.core.errors import PipelineError

log = logging.getLogger("preprocess")

# the count of distinct words is unbounded in principle; the trainer keeps every word at the
# minimum frequency or above (the cap only bounds its vocabulary's type)
ALL_WORDS = 2 ** 31 - 1


def frequent_split_words(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_words: int,
                         min_frequency: int) -> list[str]:
    """Up to `max_words` words of `texts`, most frequent first (ties in code-point order), that occur
    at least `min_frequency` times and that `tokenizer` cuts into several pieces, none unknown.

    A word is what the tokenizer itself sees: its normaliser's output (lower-cased, accents
    stripped for an uncased BERT) cut by its pre-tokeniser (whitespace and punctuation), holding a
    letter and letters or digits only (no numbers, no punctuation). The words are counted by the
    `tokenizers` WordLevel trainer (in Rust, over all cores), which numbers its vocabulary by
    descending count, then by the word: the order, and so the words chosen, are the same every run."""
    backend = tokenizer.backend_tokenizer
    ranked = sorted(ranked_words(backend.normalizer, backend.pre_tokenizer, texts, min_frequency).items(),
                    key=lambda item: item[1])
    vocabulary, unknown = tokenizer.get_vocab(), tokenizer.unk_token
    chosen: list[str] = []
    for word, _ in ranked:
        if len(chosen) == max_words:
            break
        if word in vocabulary or not word.isalnum() or not any(char.isalpha() for char in word):
            continue
        pieces = [token.value for token in backend.model.tokenize(word)]
        if len(pieces) > 1 and unknown not in pieces:
            chosen.append(word)
    return chosen


def ranked_words(normalizer: Any, pre_tokenizer: Any, texts: Iterable[str], min_frequency: int) -> dict[str, int]:
    """Every word of `texts` seen at least `min_frequency` times -> its rank (descending count, then the
    word), a word being what `normalizer` and `pre_tokenizer` make of the text: counted by the
    `tokenizers` WordLevel trainer (in Rust, over all cores)."""
    counter = Tokenizer(WordLevel(unk_token="[UNK]"))
    counter.normalizer = normalizer
    counter.pre_tokenizer = pre_tokenizer
    counter.train_from_iterator(texts, WordLevelTrainer(vocab_size=ALL_WORDS, min_frequency=min_frequency,
                                                        special_tokens=[], show_progress=False))
    return counter.get_vocab()


def add_whole_words(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> None:
    """Add `words` to `tokenizer` as tokens matched only as whole words (never inside a longer word)
    of the normalised text (so `Licensor` is the token `licensor` of an uncased vocabulary), in order."""
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True) for word in words])


def extend_vocabulary(tokenizer: PreTrainedTokenizerBase, train_texts: Iterable[str], max_words: int,
                      min_frequency: int) -> list[str]:
    """Add the training split's frequent split words (`frequent_split_words`) to `tokenizer`; returns them."""
    words = frequent_split_words(tokenizer, train_texts, max_words, min_frequency)
    add_whole_words(tokenizer, words)
    # the count only: the words come from the corpus, and logs never quote it
    log.info("vocabulary extended by %d word(s) of the training split (up to %d asked, each at least %d times)",
             len(words), max_words, min_frequency)
    return words


def added_words(tokenizer: PreTrainedTokenizerBase, base_tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The tokens `tokenizer` holds beyond `base_tokenizer` (word -> id), in id order."""
    base = base_tokenizer.get_vocab()
    return dict(sorted(((token, index) for token, index in tokenizer.get_vocab().items() if token not in base),
                       key=lambda item: item[1]))


def initialise_added_embeddings(masked_lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                                base_tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Resize `masked_lm` (the base checkpoint's masked LM) to `tokenizer`, whose added words the
    base vocabulary splits, and start each added word's input embedding, output (decoder) row and
    output bias as the mean of its base pieces'. Returns the added words (word -> id); none: nothing changes.

    The resize happens under a forked generator: transformers fills the new rows randomly first,
    and the run's later draws must not depend on how many words were added."""
    base_vocabulary, vocabulary = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    if any(vocabulary.get(token) != index for token, index in base_vocabulary.items()):
        raise PipelineError("the shards' tokenizer is not the base checkpoint's vocabulary (extended or not): "
                            "preprocess again with this model.base_checkpoint and preprocess.tokenizer: base")
    words = added_words(tokenizer, base_tokenizer)
    if not words:
        return words
    input_rows = masked_lm.get_input_embeddings().weight
    pieces = {word: base_tokenizer(word, add_special_tokens=False)["input_ids"] for word in words}
    for word, ids in pieces.items():
        if not ids or max(ids) >= input_rows.shape[0] or base_tokenizer.unk_token_id in ids:
            raise PipelineError(f"the shards' tokenizer adds a token the base checkpoint's vocabulary cannot spell "
                                f"(token {words[word]}): preprocess again with this model.base_checkpoint")
    size = max(input_rows.shape[0], len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        masked_lm.resize_token_embeddings(size, mean_resizing=False)
    inputs, output = masked_lm.get_input_embeddings().weight, masked_lm.get_output_embeddings()
    rows = [inputs]
    if output is not None and output.weight is not inputs:  # untied: the decoder's rows too
        rows.append(output.weight)
    if output is not None and getattr(output, "bias", None) is not None:  # BERT's decoder bias (predictions.bias)
        rows.append(output.bias)
    with torch.no_grad():
        for word, index in words.items():
            ids = torch.tensor(pieces[word])
            for matrix in rows:
                matrix[index] = matrix[ids].mean(dim=0)
    return words

