"""Small 2D backbones for tiles (timm), the tile encoder used by finetune, and pixel decoding."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.histopathology.config import HistoModelConfig

MEAN, STD = 0.5, 0.25  # fixed pixel normalisation: tiles in [0, 1] -> about [-2, 2]


def decode_tiles(blobs: list[bytes]) -> torch.Tensor:
    """Raw RGB uint8 tiles (square, stored as bytes) -> float [n, 3, s, s] in [0, 1]."""
    side = int(round((len(blobs[0]) / 3) ** 0.5))
    array = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), side, side, 3)
    return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float() / 255.0


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def build_backbone(cfg: HistoModelConfig, image_size: int) -> nn.Module:
    """A small timm ResNet (BasicBlocks, widths w, 2w, 4w, 8w) or ViT (embed 4w); no head."""
    if cfg.backbone == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        widths = tuple(cfg.width * 2 ** i for i in range(4))
        # one 3x3 stem conv and no max-pooling: tiles are 32-96 pixels, not 224
        model = ResNet(BasicBlock, layers=(cfg.depth,) * 4, channels=widths, num_classes=0, zero_init_last=False,
                       stem_width=max(1, cfg.width // 2), stem_type="deep")  # stem outputs 2 * stem_width
        model.conv1 = nn.Conv2d(3, cfg.width, 3, stride=cfg.stem_stride, padding=1, bias=False)
        model.bn1 = nn.BatchNorm2d(cfg.width)
        model.maxpool = nn.Identity()
        return model
    from timm.models.vision_transformer import VisionTransformer

    if image_size % cfg.patch_size:
        raise PipelineError(f"model.patch_size {cfg.patch_size} does not divide the tile size {image_size}")
    return VisionTransformer(img_size=image_size, patch_size=cfg.patch_size, embed_dim=4 * cfg.width,
                             depth=cfg.depth, num_heads=cfg.num_heads, num_classes=0, global_pool="avg")


def feature_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


class TileEncoder(Encoder):
    """Backbone features of tiles; a labeled row holding several tiles of one slide (a bag) is
    mean-pooled into one slide embedding."""

    def __init__(self, backbone: nn.Module, cfg: HistoModelConfig, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.image_size = image_size
        self.dim = feature_dim(backbone)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        blobs = [blob for s in samples for blob in s["pixels"]]
        bags = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(s["pixels"]) for s in samples]))
        return {"images": normalise(decode_tiles(blobs)), "bag": bags}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # A parameter-free normalisation before any head, as MAE's linear probing adds one:
        # features of a random or drifting backbone keep one scale, so a probe's head (folded
        # with its feature scaler for LP-FT) does not saturate when fine-tuning moves them.
        features = nn.functional.layer_norm(self.backbone(batch["images"]), (self.dim,))
        bags = batch["bag"]
        n_bags = int(bags.max()) + 1 if len(bags) else 0
        if n_bags == len(bags):
            return features
        pooled = torch.zeros(n_bags, features.shape[1], dtype=features.dtype,
                             device=features.device).index_add_(0, bags, features)
        return pooled / torch.bincount(bags, minlength=n_bags).unsqueeze(1).to(features.dtype)

    def save(self, out_dir: Path) -> None:
        save_backbone(self.backbone, self.cfg, self.image_size, out_dir)


def save_backbone(backbone: nn.Module, cfg: HistoModelConfig, image_size: int, out_dir: Path) -> None:
    """`model.safetensors` and `config.json` (the model block and the tile size)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"model": asdict(cfg), "image_size": image_size}, indent=2))


def load_weights(backbone: nn.Module, path: Path) -> None:
    """Load a backbone state dict from a .safetensors file (or a folder holding model.safetensors)."""
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise PipelineError(f"checkpoint {path} not found: give a .safetensors file or a folder with model.safetensors")
    state = load_file(str(file))
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PipelineError(f"checkpoint {path} does not fit model settings in params.yaml "
                            f"(missing {len(missing)} and unexpected {len(unexpected)} tensors, e.g. "
                            f"{(missing or unexpected)[:2]}); set model.backbone/width/depth to match it")


def load_tile_encoder(init: str, cfg: HistoModelConfig, image_size: int, pretrained_dir: Path, seed: int) -> TileEncoder:
    """ssl: the pretrained backbone; scratch: random init from `seed`; generic: model.init_checkpoint."""
    torch.manual_seed(seed)
    if init == "ssl":
        saved = json.loads((pretrained_dir / "config.json").read_text())
        cfg = HistoModelConfig(**saved["model"])
        backbone = build_backbone(cfg, saved["image_size"])
        load_weights(backbone, pretrained_dir)
        return TileEncoder(backbone, cfg, saved["image_size"])
    backbone = build_backbone(cfg, image_size)
    if init == "generic":
        if not cfg.init_checkpoint:
            raise PipelineError("init `generic` needs model.init_checkpoint in params.yaml")
        load_weights(backbone, Path(cfg.init_checkpoint))
    elif init != "scratch":
        raise PipelineError(f"unknown init {init!r}")
    return TileEncoder(backbone, cfg, image_size)
