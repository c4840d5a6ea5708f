from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from tests.conftest import run_stages, write_params
from tests.ssl_models.medical_files import assert_learns_then_reloads, blob_volume, cube_rows, medical_params, write_nifti


# DINO's loss is a cross-entropy to a moving target: with the teacher's temperature fixed (no warm-up,
# which raises the target's entropy) and a slow centre, what falls is the student's distance to it
DINO_FIXED_TARGET = {"teacher_temp": 0.04, "center_momentum": 0.99}


@pytest.mark.parametrize("method, backbone, options", [
    ("mae", "vit", {}), ("vit_inpainting_contrastive", "vit", {}), ("simclr", "resnet", {}),
    ("barlow_twins", "resnet", {}), ("dino", "resnet", DINO_FIXED_TARGET),
    ("dino", "vit", {**DINO_FIXED_TARGET, "ibot_weight": 1.0})])
def test_each_method_learns_and_its_encoder_is_what_finetuning_loads(method: str, backbone: str, options: dict,
                                                                     tmp_path: Path) -> None:
    write_params(tmp_path, medical_params(model={"backbone": backbone}, pretrain={"method": method,
                                                                                  "options": options}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    torch.manual_seed(0)
    model = domain.build_pretrain_method(cfg, tmp_path)
    rows = cube_rows(8)
    assert_learns_then_reloads(model, domain, cfg, tmp_path, rows, learning_rate=3e-3, steps=15)
    with torch.no_grad():
        scratch, again = (domain.load_encoder("scratch", cfg, tmp_path, tmp_path / "encoder", seed=1) for _ in "ab")
        assert all(torch.equal(a, b) for a, b in zip(scratch.state_dict().values(), again.state_dict().values()))
        assert not torch.allclose(scratch(scratch.collate(rows)), model.embed(rows), atol=1e-3)


def test_the_encoder_is_the_methods_own_modules(tmp_path: Path) -> None:
    write_params(tmp_path, medical_params(pretrain={"method": "mae"}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    method = domain.build_pretrain_method(cfg, tmp_path)
    # the MAE trains the ViT's own patch embedding and blocks: one set of weights, saved as the encoder
    assert method.mae.patch_embedding is method.encoder().backbone.patch_embedding
    assert method.mae.blocks[0] is method.encoder().backbone.blocks[0]


def test_a_vit_method_on_a_resnet_is_a_config_error(tmp_path: Path) -> None:
    write_params(tmp_path, medical_params(model={"backbone": "resnet"}, pretrain={"method": "mae"}))
    with pytest.raises(PipelineError, match="set model.backbone: vit"):
        load_config("medical", tmp_path / "params.yaml")


def test_resuming_from_a_checkpoint_gives_the_same_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Views and masks come from per-sample seeds of (seed, step): a run resumed from step 3
    ends where an uninterrupted run does."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    for i in range(12):
        write_nifti(tmp_path / "corpus" / f"v{i}.nii.gz", blob_volume(rng, 16, i % 2 == 0))
    write_params(tmp_path, medical_params(pretrain={"method": "vit_inpainting_contrastive", "steps": 6,
                                                    "checkpoint_every": 3, "keep_checkpoints": 2}))
    run_stages(tmp_path, "medical", "ingest", "preprocess", "pretrain")
    weights = tmp_path / "models/medical/pretrain/encoder/backbone.safetensors"
    uninterrupted = load_file(str(weights))
    shutil.rmtree(tmp_path / "models/medical/pretrain")
    (tmp_path / "models/medical/checkpoints/step_00000006.pt").unlink()  # as if killed after step 3's checkpoint
    caplog.set_level("INFO")
    run_stages(tmp_path, "medical", "pretrain")
    assert "resuming medical pretraining from step 3" in caplog.text
    resumed = load_file(str(weights))
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_a_monai_vit_autoencoder_checkpoint_is_the_generic_init(tmp_path: Path) -> None:
    """MONAI's published self-supervised weights are a ViTAutoEnc state dict: its encoder tensors
    (patch_embedding, blocks, norm) load into the ViT backbone by name and shape. The path is
    relative to the project root, not the working directory."""
    from monai.networks.nets import ViTAutoEnc

    autoencoder = ViTAutoEnc(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=48, num_layers=1,
                             num_heads=2, spatial_dims=3)
    torch.save({"state_dict": autoencoder.state_dict()}, tmp_path / "ssl_pretrained.pt")
    write_params(tmp_path, medical_params(model={"base_checkpoint": "ssl_pretrained.pt", "patch_size": 4}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    assert domain.available_inits(cfg) == ["ssl", "scratch", "generic", "baseline"]
    encoder = domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
    loaded = encoder.backbone.state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], autoencoder.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(loaded["patch_embedding.position_embeddings"],
                       autoencoder.state_dict()["patch_embedding.position_embeddings"])
    write_params(tmp_path, medical_params(model={"base_checkpoint": "ssl_pretrained.pt", "patch_size": 4,
                                                 "hidden_size": 32}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="of another shape"):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
