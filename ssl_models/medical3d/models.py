"""3D backbones (MONAI ViT, MONAI 3D ResNet) and the encoder the probes and fine-tuning use."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.medical3d.config import VolumeModelConfig

log = logging.getLogger(__name__)


def build_backbone(cfg: VolumeModelConfig) -> nn.Module:
    from monai.networks.nets import ResNet, ViT

    if cfg.backbone == "vit":
        return ViT(in_channels=1, img_size=cfg.size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                   mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                   classification=False, spatial_dims=3)
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=cfg.resnet_widths, spatial_dims=3,
                  n_input_channels=1, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
                  feed_forward=False, num_classes=1)


def feature_dim(cfg: VolumeModelConfig) -> int:
    return cfg.hidden_size if cfg.backbone == "vit" else cfg.resnet_widths[-1]


def pooled_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S, S] -> [B, dim]: mean of the ViT's tokens, or the ResNet's global pool."""
    out = backbone(images)
    if isinstance(out, tuple):  # MONAI ViT returns (tokens, hidden states)
        return out[0].mean(dim=1)
    return out


def images_of(rows: list[dict[str, Any]]) -> torch.Tensor:
    """Rows of a shard (float16 bytes + shape) -> a float32 batch [B, 1, S, S, S]."""
    cubes = [np.frombuffer(row["image"], dtype=np.float16).reshape(row["shape"]) for row in rows]
    return torch.from_numpy(np.stack(cubes).astype(np.float32))[:, None]


class VolumeEncoder(Encoder):
    """A 3D backbone with pooling: one feature vector per volume."""

    def __init__(self, cfg: VolumeModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg)
        self.dim = feature_dim(cfg)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"image": images_of(samples)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled_features(self.backbone, batch["image"])

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.backbone.state_dict().items()},
                  str(out_dir / "backbone.safetensors"))
        (out_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1))


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the tensors whose names and shapes match (MONAI's ViTAutoEnc and ViT share
    `patch_embedding`, `blocks` and `norm`); fail when most of the backbone would stay random."""
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) / 2:
        missing = next(k for k in own if k not in usable)
        found = tuple(state[missing].shape) if missing in state else "absent"
        raise PipelineError(f"checkpoint {source} has no tensor matching {len(own) - len(usable)} of the "
                            f"backbone's {len(own)} (e.g. {missing}: needs {tuple(own[missing].shape)}, "
                            f"checkpoint has {found}); check model.backbone and its sizes")
    if len(usable) < len(own):
        log.warning("checkpoint %s: %d of %d backbone tensors loaded, the rest stay random",
                    source, len(usable), len(own))
    backbone.load_state_dict(usable, strict=False)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PipelineError(f"checkpoint {path} not found; set model.base_checkpoint to a local file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_volume_encoder(init: str, cfg: VolumeModelConfig, pretrained_dir: Path, seed: int) -> VolumeEncoder:
    """`ssl`: the pretrained backbone; `scratch`: random init from `seed`; `generic`: base_checkpoint."""
    torch.manual_seed(seed)
    encoder = VolumeEncoder(cfg)
    if init == "ssl":
        load_backbone_weights(encoder.backbone, load_file(str(pretrained_dir / "backbone.safetensors")),
                              str(pretrained_dir))
    elif init == "generic":
        load_backbone_weights(encoder.backbone, read_state(Path(str(cfg.base_checkpoint))), str(cfg.base_checkpoint))
    return encoder
