"""Small 2D backbones for tiles (timm), the tile encoder that pretraining and finetune share,
and pixel decoding."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import load_checkpoint_strictly
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


class TileEncoder(Encoder):
    """Backbone features of tiles; a labeled row holding several tiles of one slide (a bag) is
    mean-pooled into one slide embedding (`instance_features` gives the tiles' own, for
    attention-based MIL). Saves its weights with the model block and tile size."""

    def __init__(self, backbone: nn.Module, cfg: HistoModelConfig, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.image_size = image_size
        self.dim = int(backbone.num_features)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        blobs = [blob for s in samples for blob in s["pixels"]]
        bags = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(s["pixels"]) for s in samples]))
        return {"images": normalise(decode_tiles(blobs)), "bag": bags}

    def instance_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each tile's features [tiles, dim], in the order of `batch["bag"]` (its row's index)."""
        # A parameter-free normalisation before any head, as MAE's linear probing adds one:
        # features of a random or drifting backbone keep one scale, so a probe's head (folded
        # with its feature scaler for LP-FT) does not saturate when fine-tuning moves them.
        return nn.functional.layer_norm(self.backbone(batch["images"]), (self.dim,))

    def pool_instances(self, features: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        """The mean of each row's tile features [rows, dim] (the rows of one tile each: as they are)."""
        n_bags = int(bags.max()) + 1 if len(bags) else 0
        if n_bags == len(bags):
            return features
        pooled = torch.zeros(n_bags, features.shape[1], dtype=features.dtype,
                             device=features.device).index_add_(0, bags, features)
        return pooled / torch.bincount(bags, minlength=n_bags).unsqueeze(1).to(features.dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pool_instances(self.instance_features(batch), batch["bag"])

    def save(self, out_dir: Path) -> None:
        """`model.safetensors` and `config.json` (the model block and the tile size)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.backbone.state_dict().items()}, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text(json.dumps({"model": asdict(self.cfg), "image_size": self.image_size},
                                                        indent=2))


# The timm description of a backbone, the one `build_resnet` and `build_vit` build from (and the
# export's config.json): a registered timm architecture, the arguments that resize it, and for the
# ResNet the small-tile stem put in place of timm's (one 3x3 conv, no max-pooling).
def timm_description(model: HistoModelConfig, image_size: int) -> dict[str, Any]:
    if model.backbone == "vit":
        return {"architecture": "vit_small_patch16_224", "stem": None,
                "model_args": {"img_size": image_size, "patch_size": model.patch_size, "embed_dim": 4 * model.width,
                               "depth": model.depth, "num_heads": model.num_heads, "num_classes": 0,
                               "global_pool": "avg"}}
    widths = [model.width * 2 ** i for i in range(4)]
    return {"architecture": "resnet18", "stem": {"width": model.width, "stride": model.stem_stride},
            "model_args": {"layers": [model.depth] * 4, "channels": widths, "num_classes": 0, "zero_init_last": False,
                           "stem_width": max(1, model.width // 2), "stem_type": "deep"}}


# What the export's card gives to embed tiles as the pipeline does (TileEncoder's collate and
# forward) with timm alone; `FOLDER` is the export's path.
EXPORT_SNIPPET = '''import json, timm, torch
from safetensors.torch import load_file
from torch import nn

config = json.load(open(f"{FOLDER}/config.json"))
model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
if config["stem"]:  # the small-tile ResNet stem: one 3x3 conv, no max-pooling
    model.conv1 = nn.Conv2d(3, config["stem"]["width"], 3, stride=config["stem"]["stride"], padding=1, bias=False)
    model.bn1, model.maxpool = nn.BatchNorm2d(config["stem"]["width"]), nn.Identity()
model.load_state_dict(load_file(f"{FOLDER}/model.safetensors"), strict=True)
model.eval()
mean = torch.tensor(config["pretrained_cfg"]["mean"]).view(1, 3, 1, 1)
std = torch.tensor(config["pretrained_cfg"]["std"]).view(1, 3, 1, 1)

@torch.no_grad()
def embed(tiles):
    """tiles: uint8 RGB [n, size, size, 3], cut as config.json's ssl_pipeline_preprocessing says;
    a slide's embedding is the mean of its tiles'."""
    x = (torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    features = model(x)
    return nn.functional.layer_norm(features, (features.shape[1],))
'''


def build_resnet(cfg: DomainConfig, shards_dir: Path) -> TileEncoder:
    """A small timm ResNet (BasicBlocks, widths w, 2w, 4w, 8w), no head."""
    from timm.models.resnet import BasicBlock, ResNet

    described = timm_description(cfg.model, cfg.preprocess.stored_size)
    backbone = ResNet(BasicBlock, **described["model_args"])  # stem outputs 2 * stem_width
    # one 3x3 stem conv and no max-pooling: tiles are 32-96 pixels, not 224
    stem = described["stem"]
    backbone.conv1 = nn.Conv2d(3, stem["width"], 3, stride=stem["stride"], padding=1, bias=False)
    backbone.bn1 = nn.BatchNorm2d(stem["width"])
    backbone.maxpool = nn.Identity()
    return _encoder(backbone, cfg)


def build_vit(cfg: DomainConfig, shards_dir: Path) -> TileEncoder:
    """A small timm ViT (embed 4w, mean-pooled tokens), no head."""
    from timm.models.vision_transformer import VisionTransformer

    return _encoder(VisionTransformer(**timm_description(cfg.model, cfg.preprocess.stored_size)["model_args"]), cfg)


def _encoder(backbone: nn.Module, cfg: DomainConfig) -> TileEncoder:
    if cfg.model.base_checkpoint:
        load_weights(backbone, cfg.resolve(cfg.model.base_checkpoint),
                     timm_description(cfg.model, cfg.preprocess.stored_size)["architecture"])
    return TileEncoder(backbone, cfg.model, cfg.preprocess.stored_size)


# A folder in timm's save_for_hf layout (config.json beside the weights: what the export and the
# pretrain stage write, safetensors, or torch's pickle where save_for_hf was left at its default)
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_weights(backbone: nn.Module, path: Path, architecture: str | None = None) -> None:
    """A timm state dict into `backbone`, strictly: a .safetensors file, a torch state dict
    (`torch.save(model.state_dict())`, read weights-only, also nested as timm's training checkpoints
    nest it), or a save_for_hf folder. A classifier the headless backbone has no place for (timm's
    `pretrained_cfg["classifier"]` of `architecture`) is left out, as timm does for num_classes=0."""
    from safetensors import SafetensorError
    from timm.models import get_pretrained_cfg
    from timm.models import load_state_dict as timm_state_dict

    file = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), None) if path.is_dir() else path
    if file is None or not file.is_file():
        raise PipelineError(f"checkpoint {path} not found: give a timm state dict (.safetensors, or .pth/.bin saved "
                            f"with torch.save) or a folder holding {' or '.join(FOLDER_WEIGHTS)}")
    try:  # timm's reader: weights_only torch.load, the EMA / `state_dict` / `model` entry, no DDP prefix
        state = timm_state_dict(str(file), weights_only=True)
    except SafetensorError as error:
        raise PipelineError(f"checkpoint {file} is not a safetensors file ({' '.join(str(error).split())}); "
                            "it was not loaded") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
        # torch's own message advises weights_only=False, which would run the pickle's code: not repeated
        raise PipelineError(f"checkpoint {file} is not a weights-only state dict (or is damaged); it was not "
                            "loaded: give a .safetensors file, or a state dict of tensors saved with "
                            "torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PipelineError(f"checkpoint {file} holds more than a state dict of tensors; give a timm model's "
                            "state_dict() (or a .safetensors file)")
    own = backbone.state_dict()
    classifier = getattr(get_pretrained_cfg(architecture), "classifier", None) if architecture else None
    if classifier and not any(name.startswith(f"{classifier}.") for name in own):
        state = {name: value for name, value in state.items() if not name.startswith(f"{classifier}.")}
    load_checkpoint_strictly(backbone, state, file, f"the {type(backbone).__name__} backbone",
                             "set model.backbone, width, depth (and patch_size, num_heads) to the checkpoint's")


def saved_model(pretrained_dir: Path) -> tuple[HistoModelConfig, int]:
    """The model block and tile size a pretrained encoder was saved with."""
    saved = json.loads((pretrained_dir / "config.json").read_text())
    return HistoModelConfig(**saved["model"]), int(saved["image_size"])
