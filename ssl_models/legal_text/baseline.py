"""The first text classifier a practitioner tries: TF-IDF of words and word pairs (the `baseline`
init; the fine-tune stage fits the logistic regression on these features).

Whole texts are used, not cut at `model.max_length`: the bag of words costs nothing per token.
The vocabulary and the IDF weights are fitted on the labeled pool only, never on test rows,
and no label is read.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ssl_models.core.config import DomainConfig
from ssl_models.core.errors import PipelineError

log = logging.getLogger("finetune")

# Below this many pool texts a word seen once is kept (min_df=1): with a handful of labels,
# dropping every word seen in a single text leaves almost nothing to learn from.
SMALL_POOL = 20


def build_vectorizer(n_pool: int):
    """sklearn's TfidfVectorizer over unigrams and bigrams with sublinear term frequency."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if n_pool >= SMALL_POOL else 1,
                           strip_accents="unicode", lowercase=True, dtype=np.float32)


def features(cfg: DomainConfig, pool: list[dict[str, Any]], test: list[dict[str, Any]]) -> tuple[Any, Any]:
    """TF-IDF matrices (scipy sparse, float32, one row per text) of the pool and test rows,
    vocabulary and IDF fitted on the pool's texts."""
    if not pool:
        raise PipelineError(f"domains.{cfg.name}: no labeled pool rows to fit the TF-IDF baseline on; "
                            "check the labels CSV and the split settings")
    pool_texts = [row["text"] for row in pool]
    vectorizer = build_vectorizer(len(pool_texts))
    try:
        pool_matrix = vectorizer.fit_transform(pool_texts)
    except ValueError:  # sklearn: "empty vocabulary" or "no terms remain" after min_df
        if vectorizer.min_df == 1:
            raise PipelineError(f"domains.{cfg.name}: the labeled pool's texts hold no words for the TF-IDF "
                                "baseline (empty or punctuation only); check the corpus") from None
        vectorizer = build_vectorizer(0)  # no word in two texts: keep the words seen once
        pool_matrix = vectorizer.fit_transform(pool_texts)
    test_matrix = vectorizer.transform([row["text"] for row in test]) if test else \
        vectorizer.transform([""])[:0]
    log.info("finetune %s: baseline TF-IDF of %d words and word pairs (min_df=%d) from %d pool texts",
             cfg.name, pool_matrix.shape[1], vectorizer.min_df, pool_matrix.shape[0])
    return pool_matrix, test_matrix
