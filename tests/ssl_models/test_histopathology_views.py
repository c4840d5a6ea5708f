"""Pathology views and the methods' data sides: each sample's views and token mask come from its
own seed, so a batch is reproducible anywhere, and a slice of it is the batch of the slice."""

from __future__ import annotations

import pickle

import pytest
import torch

from ssl_models.core.modules import sample_seeds
from ssl_models.histopathology.views import MaskedView, TwoViews, batch_styles_standardization, hed_jitter
from ssl_models.histopathology.config import AugmentConfig
from tests.ssl_models.histo_files import ihc

DATA_SIDES = {
    "two-views": TwoViews(AugmentConfig(blur_probability=0.5)),
    "masked-view": MaskedView(AugmentConfig(), patches=64, prefix_tokens=1, mask_ratio=0.75),
}


def tile_rows(n: int = 12, size: int = 32) -> list[dict]:
    image = ihc(0, 0, 512)
    return [{"pixels": image[40 * (i // 6) + 30:, 70 * (i % 6) + 10:][:size, :size].tobytes()} for i in range(n)]


@pytest.mark.parametrize("name", DATA_SIDES)
def test_a_batch_is_a_function_of_rows_and_seeds_only(name: str) -> None:
    data_side, rows, seeds = DATA_SIDES[name], tile_rows(), sample_seeds(0, 7, range(12))
    global_rng = torch.get_rng_state()
    batch = data_side(rows, seeds)
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global generator is never drawn from
    again = pickle.loads(pickle.dumps(data_side))(rows, seeds)  # as a DataLoader worker would run it
    assert batch.keys() == again.keys() and all(torch.equal(batch[k], again[k]) for k in batch)
    other = data_side(rows, sample_seeds(0, 8, range(12)))
    assert not torch.equal(batch[next(iter(batch))], other[next(iter(other))])
    for key, value in batch.items():
        assert value.shape[0] == 12 and value.device.type == "cpu", key


@pytest.mark.parametrize("name", DATA_SIDES)
def test_a_slice_of_the_batch_is_the_batch_of_the_slice(name: str) -> None:
    data_side, rows, seeds = DATA_SIDES[name], tile_rows(), sample_seeds(3, 1, range(12))
    whole = data_side(rows, seeds)
    parts = [data_side(rows[:5], seeds[:5]), data_side(rows[5:], seeds[5:])]
    for key in whole:
        assert torch.equal(torch.cat([part[key] for part in parts]), whole[key]), key


def test_two_views_keep_the_tile_shape_and_differ_from_each_other() -> None:
    batch = TwoViews(AugmentConfig(blur_probability=1.0))(tile_rows(), sample_seeds(0, 0, range(12)))
    first, second = batch["first"] * 0.25 + 0.5, batch["second"] * 0.25 + 0.5  # back to [0, 1]
    assert first.shape == (12, 3, 32, 32) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert all(not torch.allclose(a, b) for a, b in zip(first, second))


def test_style_standardization_is_a_batch_level_draw_from_the_first_seed() -> None:
    data_side, rows = TwoViews(AugmentConfig(batch_styles_standardization=True)), tile_rows()
    seeds = sample_seeds(0, 2, range(12))
    batch = data_side(rows, seeds)
    assert torch.equal(batch["first"], data_side(rows, seeds)["first"])
    assert not torch.equal(batch["first"][6:], data_side(rows[6:], seeds[6:])["first"])  # exempt: it mixes the batch


def test_token_masks_keep_the_class_token_and_a_quarter_of_the_patches() -> None:
    batch = DATA_SIDES["masked-view"](tile_rows(), sample_seeds(0, 0, range(12)))
    keep, mask = batch["idx_keep"], batch["idx_mask"]
    assert keep.shape == (12, 1 + 16) and mask.shape == (12, 48)  # as lightly's random_token_mask
    assert (keep[:, 0] == 0).all() and (mask > 0).all()
    assert all(sorted(k.tolist() + m.tolist()) == list(range(65)) for k, m in zip(keep, mask))
    assert len({tuple(k.tolist()) for k in keep}) == 12


def test_hed_jitter_changes_stain_colour_not_structure() -> None:
    images = torch.from_numpy(ihc(size=32)).permute(2, 0, 1).float().unsqueeze(0).repeat(4, 1, 1, 1) / 255
    scale, shift = 1 + (torch.rand(4, 3) * 2 - 1) * 0.1, (torch.rand(4, 3) * 2 - 1) * 0.1
    jittered = hed_jitter(images, scale, shift)
    assert not torch.allclose(jittered, images, atol=1e-3)
    unchanged = hed_jitter(images, torch.ones(4, 3), torch.zeros(4, 3))
    assert torch.allclose(unchanged, images, atol=2e-3)  # deconvolution and back
    for original, view in zip(images, jittered):  # brightness ordering of pixels barely moves
        a, b = original.mean(0).flatten(), view.mean(0).flatten()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.95


def test_batch_styles_standardization_gives_the_batch_one_style() -> None:
    crops = [torch.from_numpy(ihc(64 * i + 40, 100, 32)).permute(2, 0, 1).float() / 255 for i in range(4)]
    faint = lambda x: 1 - (1 - x) * 0.4  # noqa: E731  (the same kind of tissue, faintly stained)
    images = torch.stack([crops[0], faint(crops[1]), crops[2], faint(crops[3])])
    standardised = batch_styles_standardization(images, style=0, low_frequency=0.1)
    means = standardised.mean(dim=(2, 3))
    assert float(means.std(0).max()) < float(images.mean(dim=(2, 3)).std(0).max()) / 3  # colour (DC) shared
    # content (phase) kept: each image still correlates best with its own original's structure
    gray = lambda x: (x.mean(1).flatten(1) - x.mean(1).flatten(1).mean(1, keepdim=True))  # noqa: E731
    a, b = gray(standardised), gray(images)
    similarity = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    assert torch.equal(similarity.argmax(1), torch.arange(4))
