from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.core.config import load_domain_config
from ssl_models.core.domain import load_domain
from tests.conftest import write_params
from tests.ssl_models.medical_files import blob_volume
from tests.ssl_models.test_medical3d_readers import medical_params


def cube_rows(n: int, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cube = (blob_volume(rng, size, i % 2 == 0) / 250).astype(np.float16)
        rows.append({"sample_id": str(i), "image": cube.tobytes(), "shape": list(cube.shape)})
    return rows


@pytest.mark.parametrize("method, backbone", [("mae", "vit"), ("vit_inpainting_contrastive", "vit"),
                                              ("simclr", "resnet")])
def test_each_method_learns_and_its_backbone_is_what_finetuning_loads(
        method: str, backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_params(tmp_path, medical_params(model={"backbone": backbone}, pretrain={"method": method}))
    monkeypatch.chdir(tmp_path)
    cfg = load_domain_config("medical")
    domain = load_domain(cfg)
    torch.manual_seed(0)
    model = domain.build_pretrain_method(cfg, tmp_path)
    rows = cube_rows(8)
    batch = model.collate(rows)

    def loss_on_fixed_views() -> float:  # views and masks come from torch's generator
        torch.manual_seed(123)
        with torch.no_grad():
            return model(batch).item()

    before = loss_on_fixed_views()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_on_fixed_views() < 0.9 * before
    model.eval()
    domain.save_pretrained(model, tmp_path / "encoder")
    encoder = domain.load_encoder("ssl", cfg, tmp_path, tmp_path / "encoder", seed=1).eval()
    with torch.no_grad():
        assert torch.allclose(encoder(encoder.collate(rows)), model.embed(rows), atol=1e-5)
        scratch = domain.load_encoder("scratch", cfg, tmp_path, tmp_path / "encoder", seed=1)
        assert not torch.allclose(scratch(scratch.collate(rows)), model.embed(rows), atol=1e-3)


def test_a_vit_method_on_a_resnet_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_models.core.errors import PipelineError

    write_params(tmp_path, medical_params(model={"backbone": "resnet"}, pretrain={"method": "mae"}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="set model.backbone: vit"):
        load_domain(load_domain_config("medical"))


def test_resuming_from_a_checkpoint_gives_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The augmentations (MONAI transforms) and masks draw from torch's generator, which a checkpoint
    restores: a run resumed from step 3 ends where an uninterrupted run does."""
    import shutil

    from safetensors.torch import load_file

    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.pretrain import pretrain
    from tests.ssl_models.medical_files import write_nifti

    rng = np.random.default_rng(0)
    for i in range(12):
        write_nifti(tmp_path / "corpus" / f"v{i}.nii.gz", blob_volume(rng, 16, i % 2 == 0))
    write_params(tmp_path, medical_params(pretrain={"method": "vit_inpainting_contrastive", "steps": 6,
                                                    "checkpoint_every": 3, "keep_checkpoints": 2}))
    monkeypatch.chdir(tmp_path)
    ingest("medical")
    preprocess("medical")
    weights = Path("models/medical/pretrain/encoder/backbone.safetensors")
    pretrain("medical")
    uninterrupted = load_file(str(weights))
    shutil.rmtree("models/medical/pretrain")
    Path("models/medical/checkpoints/step_00000006.pt").unlink()  # as if killed after step 3's checkpoint
    caplog.set_level("INFO")
    pretrain("medical")
    assert "resuming medical pretraining from step 3" in caplog.text
    resumed = load_file(str(weights))
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_a_monai_vit_autoencoder_checkpoint_is_the_generic_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI's published self-supervised weights are a ViTAutoEnc state dict: its encoder tensors
    (patch_embedding, blocks, norm) load into the ViT backbone by name and shape."""
    from monai.networks.nets import ViTAutoEnc

    from ssl_models.core.errors import PipelineError

    autoencoder = ViTAutoEnc(in_channels=1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=48, num_layers=1,
                             num_heads=2, spatial_dims=3)
    torch.save({"state_dict": autoencoder.state_dict()}, tmp_path / "ssl_pretrained.pt")
    write_params(tmp_path, medical_params(model={"base_checkpoint": "ssl_pretrained.pt", "patch_size": 4}))
    monkeypatch.chdir(tmp_path)
    cfg = load_domain_config("medical")
    domain = load_domain(cfg)
    assert domain.available_inits(cfg) == ["ssl", "scratch", "generic"]
    encoder = domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
    loaded = encoder.backbone.state_dict()
    assert torch.equal(loaded["blocks.0.attn.qkv.weight"], autoencoder.state_dict()["blocks.0.attn.qkv.weight"])
    assert torch.equal(loaded["patch_embedding.position_embeddings"],
                       autoencoder.state_dict()["patch_embedding.position_embeddings"])
    write_params(tmp_path, medical_params(model={"base_checkpoint": "ssl_pretrained.pt", "patch_size": 4,
                                                 "hidden_size": 32}))
    cfg = load_domain_config("medical")
    with pytest.raises(PipelineError, match="no tensor matching"):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
