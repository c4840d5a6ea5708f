from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models.core.config import parse_section
from ssl_models.histopathology.augment import batch_styles_standardization, hed_jitter, pathology_view
from ssl_models.histopathology.backbones import build_backbone
from ssl_models.histopathology.config import HISTO_METHODS, AugmentConfig, HistoModelConfig
from tests.ssl_models.histo_files import ihc


def real_tile_rows(n: int = 32, size: int = 32) -> list[dict]:
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    rows = []
    for i in range(n):
        y, x = 48 * (i // 8) + 40, 56 * (i % 8) + 20
        rows.append({"pixels": image[y:y + size, x:x + size].tobytes()})
    return rows


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on shared CPU cores: one thread is several times faster (as model.torch_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BSS = {"batch_styles_standardization": True}
CASES = [("simclr", "resnet", {"loss": "ntxent"}, {}), ("simclr", "resnet", {"loss": "dcl"}, {}),
         ("simclr", "resnet", {"loss": "dcl"}, BSS), ("vicreg", "resnet", {}, {}), ("byol", "resnet", {}, {}),
         ("mae", "vit", {}, {})]
IDS = ["simclr-ntxent", "simclr-dcl", "simclr-dcl-bss", "vicreg", "byol", "mae-vit"]


@pytest.mark.parametrize("method_name,backbone,options,augment", CASES, ids=IDS)
def test_each_method_lowers_its_loss_in_a_few_steps(method_name: str, backbone: str, options: dict,
                                                    augment: dict) -> None:
    torch.manual_seed(0)
    model_cfg = HistoModelConfig(backbone=backbone, width=8 if backbone == "resnet" else 16, depth=1 if backbone == "resnet" else 2)
    method = HISTO_METHODS.get(method_name)(build_backbone(model_cfg, 32), AugmentConfig(**augment), **options)
    batch = method.collate(real_tile_rows())
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)

    def loss_on_fixed_views() -> float:
        state = torch.get_rng_state()
        torch.manual_seed(123)  # the same views and masks before and after training
        with torch.no_grad():
            value = float(method(batch))
        torch.set_rng_state(state)
        return value

    before = loss_on_fixed_views()
    for _ in range(12):
        loss = method(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert np.isfinite(before)
    assert loss_on_fixed_views() < before
    assert method.embed(real_tile_rows(4)).shape == (4, method.backbone.num_features)


def test_views_keep_the_tile_shape_and_differ_between_draws() -> None:
    images = torch.from_numpy(ihc(size=32)).permute(2, 0, 1).float().unsqueeze(0).repeat(8, 1, 1, 1) / 255
    torch.manual_seed(0)
    first = pathology_view(images, AugmentConfig(blur_probability=1.0))
    second = pathology_view(images, AugmentConfig(blur_probability=1.0))
    assert first.shape == images.shape and 0 <= float(first.min()) and float(first.max()) <= 1
    assert not torch.allclose(first, second)
    torch.manual_seed(0)
    assert torch.equal(first, pathology_view(images, AugmentConfig(blur_probability=1.0)))  # seeded: resumable


def test_hed_jitter_changes_stain_colour_not_structure() -> None:
    images = torch.from_numpy(ihc(size=32)).permute(2, 0, 1).float().unsqueeze(0).repeat(4, 1, 1, 1) / 255
    torch.manual_seed(1)
    jittered = hed_jitter(images, 0.1)
    assert not torch.allclose(jittered, images, atol=1e-3)
    for original, view in zip(images, jittered):  # brightness ordering of pixels barely moves
        a, b = original.mean(0).flatten(), view.mean(0).flatten()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.95


def test_batch_styles_standardization_gives_the_batch_one_style() -> None:
    crops = [torch.from_numpy(ihc(64 * i + 40, 100, 32)).permute(2, 0, 1).float() / 255 for i in range(4)]
    faint = lambda x: 1 - (1 - x) * 0.4  # noqa: E731  (the same kind of tissue, faintly stained)
    images = torch.stack([crops[0], faint(crops[1]), crops[2], faint(crops[3])])
    torch.manual_seed(0)
    standardised = batch_styles_standardization(images, low_frequency=0.1)
    means = standardised.mean(dim=(2, 3))
    assert float(means.std(0).max()) < float(images.mean(dim=(2, 3)).std(0).max()) / 3  # colour (DC) shared
    # content (phase) kept: each image still correlates best with its own original's structure
    gray = lambda x: (x.mean(1).flatten(1) - x.mean(1).flatten(1).mean(1, keepdim=True))  # noqa: E731
    a, b = gray(standardised), gray(images)
    similarity = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    assert torch.equal(similarity.argmax(1), torch.arange(4))


def test_mae_on_a_resnet_and_a_typo_in_augment_fail_with_clear_messages() -> None:
    from ssl_models.core.errors import PipelineError
    from ssl_models.histopathology.config import split_options

    with pytest.raises(PipelineError, match="needs model.backbone: vit"):
        HISTO_METHODS.get("mae")(build_backbone(HistoModelConfig(width=8), 32), AugmentConfig())
    with pytest.raises(PipelineError, match="hed_jiter"):
        split_options({"augment": {"hed_jiter": 0.1}})
    with pytest.raises(PipelineError, match="valid names: byol, mae, simclr, vicreg"):
        HISTO_METHODS.check("dino")
    with pytest.raises(PipelineError, match="backbone"):
        parse_section(HistoModelConfig, {"backbone": "resnet50"}, "model")
