"""MONAI's SwinUNETR recipe for volumes (`swin` backbone, `swin_ssl` method): it learns, its views are
what the paper's are, SwinUNETR's checkpoint layouts load strictly (one line when they do not fit),
and the export is a MONAI network whose tensors a fresh SwinUNETR takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import sample_seeds
from ssl_models.medical3d.swin import published_layout  # checked against MONAI's own `load_from` below
from ssl_models.medical3d.views import images_of
from tests.conftest import write_params
from tests.ssl_models.medical_files import assert_learns_then_reloads, cube_rows, medical_params

# tiny on the CPU: 32-voxel cubes (the smallest a SwinUNETR takes), one Swin block per stage
SWIN = {"backbone": "swin", "size": 32, "swin_depths": [1, 1, 1, 1]}


def swin_config(root: Path, base_checkpoint: str | None = None, **model: Any) -> tuple[Any, Any]:
    write_params(root, medical_params(model={**SWIN, **model, "base_checkpoint": base_checkpoint},
                                      pretrain={"method": "swin_ssl"}))
    return load_config("medical", root / "params.yaml")


def swin_unetr(seed: int = 1, **sizes: Any) -> torch.nn.Module:
    """A MONAI SwinUNETR of the tiny encoder's sizes (or others), its weights drawn from `seed`."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    settings = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24), "window_size": 4, **sizes}
    return SwinUNETR(in_channels=1, out_channels=2, **settings)


def assert_holds(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_swin_ssl_learns_and_its_encoder_is_what_finetuning_loads(tmp_path: Path) -> None:
    cfg, domain = swin_config(tmp_path)
    torch.manual_seed(0)
    model = domain.build_pretrain_method(cfg, tmp_path)
    rows = cube_rows(2, size=32)
    encoder = assert_learns_then_reloads(model, domain, cfg, tmp_path, rows, learning_rate=1e-3, steps=5)
    assert model.embed(rows).shape == (2, 16 * 12) == (2, encoder.dim)


def test_the_views_are_quarter_turns_of_the_volume_with_noised_boxes(tmp_path: Path) -> None:
    """rot_rand and patch_rand_drop of MONAI's pretraining: each target is the cube turned by its
    label's quarter turns in one plane; its view differs from it in boxes only; all of it from the
    volume's seed."""
    cfg, domain = swin_config(tmp_path)
    data_side = domain.build_pretrain_method(cfg, tmp_path).data_side()
    rows = cube_rows(8, size=32)
    seeds = sample_seeds(0, 0, range(len(rows)))
    batch = data_side(rows, seeds)
    again = data_side(rows[4:], seeds[4:])  # another share of the batch, as another process builds it
    assert all(torch.equal(batch[k][4:], again[k]) for k in batch)
    clean = images_of(rows)
    for i in range(len(rows)):
        for view in range(2):
            turns = int(batch["rotations"][i, view])
            assert torch.equal(batch["targets"][i, view], torch.rot90(clean[i], turns, dims=(2, 3)))
    assert len(set(batch["rotations"].flatten().tolist())) == 4  # every class drawn among 16 views
    noised = (batch["views"] != batch["targets"]).float().mean(dim=(2, 3, 4, 5))
    assert 0.01 < float(noised.min()) and float(noised.max()) < 0.6


@pytest.mark.parametrize("layout", ["swinunetr", "published", "sslhead-ddp"])
def test_a_swinunetr_checkpoint_loads_strictly_and_pretraining_continues(tmp_path: Path, layout: str) -> None:
    """A SwinUNETR's state dict (its decoder left out), MONAI's published model_swinvit.pt layout (the
    one SwinUNETR.load_from reads) and a DataParallel SSLHead checkpoint (its heads left out)."""
    network = swin_unetr()
    encoder_part = network.swinViT.state_dict()
    if layout == "swinunetr":
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "base.safetensors"))
        name = "base.safetensors"
    elif layout == "published":
        checkpoint = published_layout(encoder_part)
        fresh = swin_unetr(seed=2)
        fresh.load_from(checkpoint)  # MONAI's own reader of that layout takes it
        assert_holds(fresh.swinViT, encoder_part)
        torch.save(checkpoint, tmp_path / "model_swinvit.pt")
        name = "model_swinvit.pt"
    else:
        heads = {"rotation_head.weight": torch.zeros(4, 192), "contrastive_head.weight": torch.zeros(512, 192)}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in {
            **{f"swinViT.{k}": v for k, v in encoder_part.items()}, **heads}.items()}}, tmp_path / "ssl.pt")
        name = "ssl.pt"
    cfg, domain = swin_config(tmp_path, name)
    method = domain.build_pretrain_method(cfg, tmp_path)
    assert_holds(method.encoder().backbone, encoder_part)
    assert_holds(domain.load_encoder("generic", cfg, tmp_path, tmp_path / "unused", seed=0).backbone, encoder_part)
    rows = cube_rows(2, size=32)
    batch = method.data_side()(rows, sample_seeds(0, 0, range(2)))
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    loss = method(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(method.encoder().backbone.patch_embed.proj.weight,
                                                    encoder_part["patch_embed.proj.weight"])


def test_a_swin_checkpoint_that_does_not_fit_is_one_line_naming_the_tensors(tmp_path: Path) -> None:
    encoder_part = dict(swin_unetr(window_size=7).swinViT.state_dict())  # SwinUNETR's default window
    encoder_part["layers1.0.blocks.0.mlp.linear1.weights_renamed"] = encoder_part.pop(
        "layers1.0.blocks.0.mlp.linear1.weight")
    torch.save(published_layout(encoder_part), tmp_path / "model_swinvit.pt")
    cfg, domain = swin_config(tmp_path, "model_swinvit.pt")
    with pytest.raises(PipelineError) as caught:
        domain.build_pretrain_method(cfg, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    for part in ("checkpoint model_swinvit.pt does not load strictly into the swin backbone",
                 "1 missing (layers1.0.blocks.0.mlp.linear1.weight)",
                 "1 unexpected (layers1.0.blocks.0.mlp.linear1.weights_renamed)",
                 "layers1.0.blocks.0.attn.relative_position_bias_table: checkpoint [2197, 3], model [343, 3]",
                 "swin_window_size"):
        assert part in message, (part, message)


def test_swin_ssl_on_another_backbone_is_one_line(tmp_path: Path) -> None:
    """Refused when params load, before any work."""
    write_params(tmp_path, medical_params(model={"backbone": "resnet"}, pretrain={"method": "swin_ssl"}))
    with pytest.raises(PipelineError, match="set model.backbone: swin"):
        load_config("medical", tmp_path / "params.yaml")


def test_the_export_is_a_monai_network_whose_tensors_a_fresh_swinunetr_takes(tmp_path: Path) -> None:
    """The bundle's network is SwinUNETR's encoder (MONAI's SwinTransformer, built by ConfigParser from
    configs/inference.json); its models/model.pt loads into a new SwinUNETR's `swinViT` strictly, or
    under `swinViT.` names with strict=False leaving only the decoder unset; the card's snippet and
    the pipeline's `load_export` embed as the encoder does."""
    from monai.bundle import ConfigParser

    from ssl_models.medical3d.backbones import EXPORT_SNIPPET

    cfg, domain = swin_config(tmp_path)
    torch.manual_seed(3)
    encoder = domain.build_encoder(cfg, tmp_path).eval()
    rows = cube_rows(2, size=32)
    with torch.no_grad():
        ours = encoder(encoder.collate(rows))
    folder = tmp_path / "export"
    folder.mkdir()
    domain.export(cfg, encoder, folder)

    exported = torch.load(folder / "models" / "model.pt", weights_only=True)
    network = swin_unetr(seed=4)
    network.swinViT.load_state_dict(exported, strict=True)
    assert_holds(network.swinViT, encoder.backbone.state_dict())
    network = swin_unetr(seed=5)
    result = network.load_state_dict({f"swinViT.{k}": v for k, v in exported.items()}, strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert not [k for k in result.missing_keys if k.startswith("swinViT.")]
    assert_holds(network.swinViT, encoder.backbone.state_dict())

    network = swin_unetr(seed=6)  # MONAI's own fine-tuning start: `load_from` the published layout
    network.load_from(torch.load(folder / "models" / "model_swinvit.pt", weights_only=True))
    assert_holds(network.swinViT, encoder.backbone.state_dict())

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    assert type(parser.get_parsed_content("network_def")) is type(network.swinViT)
    namespace: dict[str, Any] = {"FOLDER": str(folder)}
    exec(EXPORT_SNIPPET, namespace)  # the model card's code, MONAI alone
    theirs = namespace["embed"](encoder.collate(rows)["image"].numpy())
    assert (theirs - ours).abs().max().item() < 1e-5
    assert json.loads((folder / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"][
        "pred"]["num_channels"] == 192
    loaded = domain.load_export(cfg, folder).eval()
    with torch.no_grad():
        assert (loaded(loaded.collate(rows)) - ours).abs().max().item() < 1e-6
