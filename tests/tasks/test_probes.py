"""The LP-FT head computes exactly the fitted probe's decision on raw features; the probe's C is
chosen by cross-validation inside the subset; frozen features project to 2D."""

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
from tasks.probes import (
    CV_SEED,
    fit_chosen_probe,
    fit_linear_probe,
    head_from_probe,
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


def test_cross_validation_picks_the_c_with_the_best_mean_macro_f1_inside_the_subset() -> None:
    x, y = weak_signal(100, seed=0)
    settings = FinetuneConfig(cv_folds=4)
    chosen, probe = fit_chosen_probe(x, y, settings)
    assert (chosen.chosen_by, chosen.folds) == ("cv", 4)
    folds = StratifiedKFold(4, shuffle=True, random_state=CV_SEED)
    means = [cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500)), x, y,
                             cv=folds, scoring="f1_macro").mean() for c in settings.linear_c_grid]
    assert len({round(m, 6) for m in means}) > 1  # the grid's values differ: the choice is not a tie
    # the scaler sees the whole subset in the search, each training fold here: a close second may swap
    assert means[settings.linear_c_grid.index(chosen.c)] >= max(means) - 0.02
    head = head_from_probe(probe, 20, ["common", "rare"])  # the LP-FT head of the chosen probe
    with torch.no_grad():
        logits = head(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], probe.decision_function(x), rtol=1e-4, atol=1e-4)


def test_ties_go_to_the_smaller_c_and_too_few_labels_take_the_grids_middle() -> None:
    x = np.zeros((12, 3))  # nothing to learn: every C scores the same
    y = ["a", "b", "c"] * 4
    chosen, _ = fit_chosen_probe(x, y, FinetuneConfig(linear_c_grid=[1.0, 0.05, 10.0]))
    assert (chosen.c, chosen.chosen_by) == (0.05, "cv")
    # one example of every class: no two folds can hold one, so the documented default applies
    chosen, probe = fit_chosen_probe(np.eye(3), ["a", "b", "c"], FinetuneConfig())
    assert (chosen.c, chosen.chosen_by, chosen.folds) == (0.1, "default", 0) and probe is not None
    # a single example of one class among splittable ones: cross-validated over the others' folds
    chosen, probe = fit_chosen_probe(np.eye(5), ["a", "a", "b", "b", "c"], FinetuneConfig())
    assert (chosen.chosen_by, chosen.folds) == ("cv", 2) and probe is not None
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
