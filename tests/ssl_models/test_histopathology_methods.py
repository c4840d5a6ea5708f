from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import sample_seeds
from ssl_models.histopathology.config import METHODS
from tests.conftest import write_params
from tests.ssl_models.histo_files import histo_params


def real_tile_rows(n: int = 32, size: int = 32) -> list[dict]:
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    rows = []
    for i in range(n):
        y, x = 48 * (i // 8) + 40, 56 * (i % 8) + 20
        rows.append({"pixels": image[y:y + size, x:x + size].tobytes()})
    return rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def histo_config(tmp_path: Path, method: str, backbone: str, options: dict) -> tuple[DomainConfig, object]:
    model = {"backbone": backbone, "width": 8, "depth": 1} if backbone == "resnet" else \
        {"backbone": "vit", "width": 16, "depth": 2}
    write_params(tmp_path, histo_params(model=model, pretrain={"method": method, "options": options}))
    return load_config("histo", tmp_path / "params.yaml")


BSS = {"batch_styles_standardization": True}
# DINO's loss is a cross-entropy to a moving target: with the teacher's temperature fixed (no warm-up,
# which raises the target's entropy) and a slow centre, what falls is the student's distance to it
DINO_FIXED_TARGET = {"teacher_temp": 0.04, "center_momentum": 0.99}
CASES = [("simclr", "resnet", {"loss": "ntxent"}), ("simclr", "resnet", {"loss": "dcl"}),
         ("simclr", "resnet", {"loss": "dcl", "augment": BSS}), ("vicreg", "resnet", {}), ("byol", "resnet", {}),
         ("mae", "vit", {}), ("barlow_twins", "resnet", {}), ("dino", "resnet", DINO_FIXED_TARGET),
         ("dino", "vit", {**DINO_FIXED_TARGET, "ibot_weight": 1.0})]
IDS = ["simclr-ntxent", "simclr-dcl", "simclr-dcl-bss", "vicreg", "byol", "mae-vit", "barlow-twins", "dino",
       "dino-ibot-vit"]


@pytest.mark.parametrize("method_name,backbone,options", CASES, ids=IDS)
def test_each_method_lowers_its_loss_in_a_few_steps(tmp_path: Path, method_name: str, backbone: str,
                                                    options: dict) -> None:
    torch.manual_seed(0)
    cfg, domain = histo_config(tmp_path, method_name, backbone, options)
    method = domain.build_pretrain_method(cfg, tmp_path)
    data_side, rows = method.data_side(), real_tile_rows()
    fixed = data_side(rows, sample_seeds(123, 0, range(len(rows))))  # the same views and masks before and after
    optimizer = torch.optim.AdamW(method.parameters(), lr=2e-3)

    def loss_on_fixed_views() -> float:
        with torch.no_grad():
            return float(method(fixed))

    before = loss_on_fixed_views()
    for step in range(12):
        loss = method(data_side(rows, sample_seeds(0, step, range(len(rows)))))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert np.isfinite(before)
    assert loss_on_fixed_views() < before
    assert method.embed(real_tile_rows(4)).shape == (4, method.encoder().dim)
    assert method.encoder() is method.backbone_encoder and method.backbone is method.encoder().backbone


def test_the_encoder_saved_after_pretraining_loads_back_for_every_init(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "mae", "vit", {})
    method = domain.build_pretrain_method(cfg, tmp_path)
    method.encoder().save(tmp_path / "encoder")
    rows = [{"pixels": [row["pixels"]]} for row in real_tile_rows(4)]
    ssl = domain.load_encoder("ssl", cfg, tmp_path, tmp_path / "encoder", seed=5).eval()
    with torch.no_grad():
        expected = method.encoder().eval()(method.encoder().collate(rows))
        assert torch.equal(ssl(ssl.collate(rows)), expected)
        scratch = [domain.load_encoder("scratch", cfg, tmp_path, tmp_path / "encoder", seed=s) for s in (0, 0, 1)]
        weights = [next(iter(e.backbone.parameters())) for e in scratch]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    with pytest.raises(PipelineError, match=r"needs domains.histo.finetune.generic_checkpoint \(or model.base_checkpoint\)"):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path / "encoder", seed=0)
    write_params(tmp_path, histo_params(model={"backbone": "vit", "width": 16, "depth": 2,
                                               "base_checkpoint": "encoder"}, pretrain={"method": "mae", "options": {}}))
    cfg, _ = load_config("histo", tmp_path / "params.yaml")  # a relative base checkpoint: from the project root
    generic = domain.load_encoder("generic", cfg, tmp_path, tmp_path / "missing", seed=0).eval()
    with torch.no_grad():
        assert torch.equal(generic(generic.collate(rows)), expected)
    assert "generic" in domain.available_inits(cfg)


def test_mae_on_a_resnet_fails_with_a_clear_message(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "simclr", "resnet", {})
    with pytest.raises(PipelineError, match="needs model.backbone: vit"):
        METHODS.get("mae")(domain.build_encoder(cfg, tmp_path), METHODS.options("mae")())
