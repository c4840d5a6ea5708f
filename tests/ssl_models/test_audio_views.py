"""The audio methods' data sides: picklable, a function of (rows, seeds) alone, per sample."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.audio.config import METHODS
from ssl_models.audio.views import alteration_masks
from ssl_models.core.modules import sample_seeds
from tests.ssl_models.test_audio_methods import method_and_rows

LENGTHS = [1.0, 0.35, 0.8, 0.12, 1.0, 0.6]  # seconds: full clips and short ones, padded to the clip length
MASKS = {"tera": "time_mask", "masked_spectrogram": "masked_tokens", "wav2vec2": "mask_time_indices",
         "hubert": "masked_steps"}


@pytest.fixture(params=METHODS.names())
def built(request: pytest.FixtureRequest, tmp_path: Path):
    name = request.param
    lengths = [min(s, 0.5) for s in LENGTHS] if name == "wav2vec2" else LENGTHS
    method, rows, _ = method_and_rows(tmp_path, name, lengths)
    return name, method.data_side(), rows


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_pickled_data_side_gives_the_same_batch_whatever_the_global_rngs(built) -> None:
    _, data_side, rows = built
    seeds = sample_seeds(0, 3, range(len(rows)))
    torch.manual_seed(0)
    np.random.seed(0)
    batch = data_side(rows, seeds)
    numpy_state = np.random.get_state()[1].copy()
    torch.manual_seed(123)
    np.random.seed(123)
    assert_same(pickle.loads(pickle.dumps(data_side))(rows, seeds), batch)
    np.random.seed(0)
    data_side(rows, seeds)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # numpy's global state is left as it was


def test_other_seeds_give_other_masks(built) -> None:
    name, data_side, rows = built
    first = data_side(rows, sample_seeds(0, 0, range(len(rows))))
    second = data_side(rows, sample_seeds(0, 1, range(len(rows))))
    assert not torch.equal(first[MASKS[name]], second[MASKS[name]])


@pytest.mark.parametrize("k", [1, 4])
def test_slices_of_a_batch_concatenate_to_the_batch(built, k: int) -> None:
    _, data_side, rows = built
    seeds = sample_seeds(0, 7, range(len(rows)))
    whole = data_side(rows, seeds)
    parts = data_side(rows[:k], seeds[:k]), data_side(rows[k:], seeds[k:])
    assert_same({key: torch.cat([parts[0][key], parts[1][key]]) for key in whole}, whole)


def test_draws_stay_inside_each_clip(built) -> None:
    name, data_side, rows = built
    batch = data_side(rows, sample_seeds(0, 0, range(len(rows))))
    if name == "tera":
        beyond = torch.arange(batch["log_mel"].shape[1])[None, :] >= batch["lengths"][:, None]
        zeroed, altered = alteration_masks(batch, ~beyond)
        assert not altered[beyond].any() and not batch["noise"][beyond].any()
        assert ((batch["frame_source"] < batch["lengths"][:, None]) | beyond).all()
        assert altered.flatten(1).any(1).all()  # every clip has something to reconstruct
        assert (zeroed[~beyond] <= altered[~beyond]).all()  # inside a clip, what is zeroed is counted
    elif name == "masked_spectrogram":
        counts = batch["masked_tokens"].sum(1)
        assert torch.equal(counts, batch["masked_valid"].sum(1)) and (counts >= 1).all()
        assert counts[1] < counts[0]  # a short clip masks its own share of its own tokens
    elif name == "hubert":  # masked time steps lie inside the clip's real steps, and every clip has some
        masked, features = batch["masked_steps"], batch["target_features"]
        real = features.abs().sum(-1) > 0  # the steps a clip's frames fill (padding has no features)
        assert not (masked & ~real).any() and masked.any(1).all()
    else:
        masked, negatives = batch["mask_time_indices"], batch["sampled_negative_indices"]
        frames = masked.shape[1]
        for row in range(len(rows)):
            if masked[row].any():
                chosen = negatives[row][masked[row]]
                assert masked[row][chosen].all()  # distractors are masked frames of the same clip
                assert (chosen != torch.arange(frames)[masked[row]][:, None]).all()  # never the frame itself
        assert masked[0].sum() > masked[3].sum()
