"""The LP-FT head computes exactly the fitted probe's decision on raw features."""

from __future__ import annotations

import numpy as np
import torch

from tasks.probes import fit_linear_probe, head_from_probe


def test_the_head_reproduces_the_probe_with_the_scaler_folded_in() -> None:
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]  # "d" never occurs in the subset
    x = rng.normal(3.0, 5.0, size=(60, 6)).astype(np.float32)
    y = [classes[i % 3] for i in range(60)]
    x[:, 0] += np.array([10.0 * (i % 3) for i in range(60)])
    probe = fit_linear_probe(x, y, c=1.0, seed=0)
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
    probe = fit_linear_probe(x, y, c=1.0, seed=0)
    head = head_from_probe(probe, 3, ["neg", "pos"])
    with torch.no_grad():
        probabilities = torch.softmax(head(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, probe.predict_proba(x), rtol=1e-4, atol=1e-5)


def test_without_a_probe_the_head_is_a_fresh_layer() -> None:
    head = head_from_probe(None, 5, ["a", "b"])
    assert head.weight.shape == (2, 5)
