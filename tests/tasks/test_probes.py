"""The LP-FT head computes exactly the fitted probe's decision on raw features; the probe's C is
chosen by cross-validation inside the subset; on imbalanced labels the probes score at least what
scikit-learn's plain balanced logistic regression scores; frozen features project to 2D."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl_models.core.config import FinetuneConfig
from ssl_models.core.splits import select_label_subset
from ssl_models.legal_text import baseline as legal_baseline
from tasks.probes import (
    CV_SEED,
    class_weights,
    fit_chosen_probe,
    fit_linear_probe,
    head_from_probe,
    probe_predictions,
    project_2d,
)


def test_the_head_reproduces_the_probe_with_the_scaler_folded_in() -> None:
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]  # "d" never occurs in the subset
    x = rng.normal(3.0, 5.0, size=(60, 6)).astype(np.float32)
    y = [classes[i % 3] for i in range(60)]
    x[:, 0] += np.array([10.0 * (i % 3) for i in range(60)])
    probe = fit_linear_probe(x, y, c=1.0)
    head = head_from_probe(probe, 6, classes)
    with torch.no_grad():
        logits = head(torch.from_numpy(x)).numpy()
    expected = probe.decision_function(x)
    np.testing.assert_allclose(logits[:, :3], expected, rtol=1e-4, atol=1e-4)
    assert (logits[:, 3] < logits[:, :3].min(axis=1)).all()  # an absent class starts below every other
    assert [classes[i] for i in logits.argmax(1)] == list(probe.predict(x))


def test_two_classes_give_the_probes_probabilities() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = ["neg" if v < 0 else "pos" for v in x[:, 1]]
    probe = fit_linear_probe(x, y, c=1.0)
    head = head_from_probe(probe, 3, ["neg", "pos"])
    with torch.no_grad():
        probabilities = torch.softmax(head(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, probe.predict_proba(x), rtol=1e-4, atol=1e-5)


def test_without_a_probe_the_head_is_a_fresh_layer() -> None:
    head = head_from_probe(None, 5, ["a", "b"])
    assert head.weight.shape == (2, 5)


def weak_signal(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """An imbalanced two-class problem whose signal is spread thin over noisy columns."""
    rng = np.random.default_rng(seed)
    y = ["rare" if i % 5 == 0 else "common" for i in range(n)]
    x = rng.normal(size=(n, 20))
    x[:, :5] += np.array([[0.8] if label == "rare" else [0.0] for label in y])
    return x, y


def fold_scores(x: np.ndarray, y: list[str], settings: FinetuneConfig, folds: int) -> np.ndarray:
    """Macro-F1 of each (fold, C of the grid), refitted here one by one with scikit-learn on the
    features standardised over the whole subset, as the search standardises them (no labels read)."""
    splits = StratifiedKFold(folds, shuffle=True, random_state=CV_SEED)
    scaled = StandardScaler().fit_transform(x)
    return np.array([cross_val_score(LogisticRegression(C=c, class_weight="balanced", max_iter=500), scaled, y,
                                     cv=splits, scoring="f1_macro") for c in settings.linear_c_grid]).T


@pytest.mark.parametrize("noise_columns, seed", [(20, 0), (100, 3), (400, 3)])
def test_cross_validation_moves_off_the_default_c_only_when_the_folds_show_it_better(noise_columns: int,
                                                                                      seed: int) -> None:
    x, y = weak_signal(100, seed=seed)
    x = np.hstack([x, np.random.default_rng(seed).normal(size=(100, noise_columns))])
    settings = FinetuneConfig(cv_folds=4)
    chosen, probe = fit_chosen_probe(x, y, settings)
    assert (chosen.chosen_by, chosen.folds) == ("cv", 4)
    scores = fold_scores(x, y, settings, 4)
    best, default = int(scores.mean(0).argmax()), settings.linear_c_grid.index(1.0)
    gains = scores[:, best] - scores[:, default]
    clear = gains.mean() > gains.std(ddof=1) / 2 + 0.02  # past the rule's threshold with room to spare
    within_noise = gains.mean() < gains.std(ddof=1) / 2 - 0.02
    assert clear or within_noise  # each case is far from the threshold (the search's scaler sees every fold)
    assert chosen.c == (settings.linear_c_grid[best] if clear else 1.0)
    head = head_from_probe(probe, x.shape[1], ["common", "rare"])  # the LP-FT head of the chosen probe
    with torch.no_grad():
        logits = head(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], probe.decision_function(x), rtol=1e-4, atol=1e-4)


def test_ties_keep_the_grids_middle_and_too_few_labels_take_it_too() -> None:
    x = np.zeros((12, 3))  # nothing to learn: every C scores the same
    y = ["a", "b", "c"] * 4
    chosen, _ = fit_chosen_probe(x, y, FinetuneConfig(linear_c_grid=[10.0, 0.05, 1.0], cv_folds=4))
    assert (chosen.c, chosen.chosen_by) == (1.0, "cv")
    # digit names (spoken digits): scikit-learn's balanced search fails on them unless encoded first
    chosen, probe = fit_chosen_probe(x, ["0", "1", "2"] * 4, FinetuneConfig(cv_folds=4))
    assert chosen.chosen_by == "cv" and list(probe.classes_) == ["0", "1", "2"]
    # one example of every class: no two folds can hold one, so the documented default applies
    chosen, probe = fit_chosen_probe(np.eye(3), ["a", "b", "c"], FinetuneConfig())
    assert (chosen.c, chosen.chosen_by, chosen.folds) == (1.0, "default", 0) and probe is not None
    # a single example of one class among splittable ones: cross-validated over the others' folds
    chosen, probe = fit_chosen_probe(np.eye(5), ["a", "a", "b", "b", "c"], FinetuneConfig(cv_folds=2))
    assert (chosen.chosen_by, chosen.folds) == ("cv", 2) and probe is not None
    # fewer examples of some class than the configured folds: two fold differences are no evidence
    chosen, probe = fit_chosen_probe(np.eye(5), ["a", "a", "b", "b", "c"], FinetuneConfig())
    assert (chosen.c, chosen.chosen_by, chosen.folds) == (1.0, "default", 2) and probe is not None
    chosen, probe = fit_chosen_probe(np.eye(5), ["a"] * 5, FinetuneConfig())
    assert probe is None  # one class: nothing to fit
    chosen, _ = fit_chosen_probe(x, y, dataclasses.replace(FinetuneConfig(), linear_c=3.0))
    assert (chosen.c, chosen.chosen_by) == (3.0, "fixed")


def test_sparse_features_are_probed_without_centring() -> None:
    rng = np.random.default_rng(2)
    dense = np.abs(rng.normal(size=(40, 8))) * (rng.random((40, 8)) < 0.3)
    dense[:, 5] = 0.0  # a word of the vocabulary no training row uses
    y = ["x" if row[0] > row[1] else "y" for row in dense]
    _, probe = fit_chosen_probe(sparse.csr_matrix(dense), y, FinetuneConfig(cv_folds=3))
    assert not any(isinstance(step, StandardScaler) for step in probe)  # no centring, no scaling
    assert 5 not in probe[0].columns_ and probe[-1].coef_.shape[1] == 7  # the unused column is dropped
    head = head_from_probe(probe, 8, ["x", "y"])
    with torch.no_grad():
        logits = head(torch.from_numpy(dense.astype(np.float32))).numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], probe.decision_function(sparse.csr_matrix(dense)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_features_project_to_two_dimensions_that_keep_the_main_spread(kind: str) -> None:
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(30, 10))) * 0.1
    x[:15, 4] += 5.0  # the dominant direction splits the rows in two
    features = sparse.csr_matrix(x) if kind == "sparse" else x
    points, method = project_2d(features)
    assert method == ("truncated_svd" if kind == "sparse" else "pca")
    points = np.array(points)
    assert points.shape == (30, 2)
    first_half, second_half = np.sort(points[:15, 0]), np.sort(points[15:, 0])
    assert first_half[0] > second_half[-1] or first_half[-1] < second_half[0]  # separated on the first axis
    assert project_2d(np.ones((1, 4)))[0] == [[0.0, 0.0]]  # one row: no axis to find


# an imbalanced label set like a real one: the largest class 70% of the rows, the smallest 2%
SHARES = {"other": 0.70, "liability": 0.10, "termination": 0.07, "law": 0.05, "arbitration": 0.04,
          "content": 0.02, "unilateral": 0.02}


def imbalanced_rows(n: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    """`n` rows of SHARES' classes: texts whose class words are drowned in shared filler (for the
    sparse TF-IDF baseline) and dense features whose class signal is weak and spread over noise
    (for a frozen encoder's probe)."""
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(list(SHARES), size=n, p=list(SHARES.values())))
    filler = [f"w{i}" for i in range(300)]
    texts = []
    for label in labels:
        words = list(rng.choice(filler, size=30))
        if label != "other" and rng.random() < 0.8:  # a fifth of the rare rows carry no class word
            words += [f"{label}{rng.integers(3)}"] * int(rng.integers(1, 3))
        texts.append(" ".join(rng.permutation(words)))
    dense = rng.normal(size=(n, 32))
    for column, label in enumerate(SHARES):
        dense[:, column] += 0.9 * np.array([label == y for y in labels])
    return texts, dense, labels


def macro_f1(truth: list[str], predicted: list[str]) -> float:
    from sklearn.metrics import f1_score

    return f1_score(truth, predicted, average="macro", zero_division=0)


def practitioner(train_x, train_y: list[str], test_x) -> list[str]:
    """The plain recipe a practitioner fits first on the same features and rows."""
    return list(LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(train_x, train_y).predict(test_x))


@pytest.mark.slow
@pytest.mark.parametrize("features", ["tfidf_baseline", "frozen_dense"])
def test_on_imbalanced_labels_the_probe_scores_what_the_plain_balanced_recipe_scores(features: str) -> None:
    texts, dense, labels = imbalanced_rows(2400, seed=5)
    pool, test = slice(0, 1800), slice(1800, None)
    if features == "tfidf_baseline":  # the legal domain's own baseline features, fitted on the pool
        pool_x, test_x = legal_baseline.features(
            dataclasses.make_dataclass("Cfg", [("name", str)])("legal"),
            [{"text": t} for t in texts[pool]], [{"text": t} for t in texts[test]])
        plain_pool_x, plain_test_x = pool_x, test_x
    else:  # a practitioner standardises dense features before a logistic regression
        pool_x, test_x = dense[pool], dense[test]
        scaler = StandardScaler().fit(pool_x)
        plain_pool_x, plain_test_x = scaler.transform(pool_x), scaler.transform(test_x)
    pool_y, test_y = labels[pool], labels[test]
    settings = FinetuneConfig()
    for fraction, seeds in ((0.05, (0, 1, 2)), (0.1, (0, 1, 2)), (1.0, (0,))):  # every seed's 100% is the pool
        ours, plain = [], []
        for seed in seeds:
            subset = select_label_subset(pool_y, fraction, seed)
            assert {pool_y[i] for i in subset} == set(SHARES)  # stratified: every class kept
            train_y = [pool_y[i] for i in subset]
            _, probe = fit_chosen_probe(pool_x[subset], train_y, settings)
            ours.append(macro_f1(test_y, probe_predictions(probe, train_y, test_x, sorted(SHARES))[0]))
            plain.append(macro_f1(test_y, practitioner(plain_pool_x[subset], train_y, plain_test_x)))
        assert np.mean(ours) >= np.mean(plain) - 0.01, (features, fraction, ours, plain)
    # the check has teeth: the unweighted probe of before falls short of the plain recipe on all labels
    _, probe = fit_chosen_probe(pool_x, pool_y, dataclasses.replace(settings, class_weight=None))
    unweighted = macro_f1(test_y, probe_predictions(probe, pool_y, test_x, sorted(SHARES))[0])
    assert unweighted < plain[0] - 0.01, (unweighted, plain)


def test_fine_tuning_weights_classes_as_the_probes_do() -> None:
    weights = class_weights(["a", "a", "a", "b"], ["a", "b", "c"], "balanced")
    # scikit-learn's balanced weights n / (classes x count); an absent class has no rows to weigh
    np.testing.assert_allclose(weights.numpy(), [4 / (2 * 3), 4 / (2 * 1), 0.0])
    assert class_weights(["a", "b"], ["a", "b"], None).tolist() == [1.0, 1.0]
