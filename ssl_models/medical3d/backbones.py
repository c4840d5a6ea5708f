"""3D backbones (MONAI ViT, MONAI 3D ResNet; SwinUNETR's Swin encoder in swin.py) as encoders, and the
saved or published weights fine-tuning loads."""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ssl_models.core.config import DomainConfig, parse_section
from ssl_models.core.domain import load_checkpoint_strictly
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.medical3d.config import VolumeModelConfig
from ssl_models.medical3d.views import images_of

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "backbone.safetensors", "config.json"


class VolumeEncoder(Encoder):
    """A 3D backbone with pooling: one feature vector per volume (the mean of a ViT's tokens,
    or a ResNet's global pool). `cfg` is the model section it was built from; `save` writes it."""

    def __init__(self, cfg: VolumeModelConfig, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.dim = dim

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"image": images_of(samples)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.backbone(batch["image"])
        if isinstance(out, tuple):  # MONAI ViT returns (tokens, hidden states)
            return out[0].mean(dim=1)
        return out

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.backbone.state_dict().items()}, str(out_dir / WEIGHTS))
        (out_dir / CONFIG).write_text(json.dumps(asdict(self.cfg), indent=1))


# The network as MONAI's ConfigParser instantiates it (the bundle's inference.json): the one
# description `build_vit` and `build_resnet` build from.
def network_def(m: VolumeModelConfig) -> dict[str, Any]:
    if m.backbone == "vit":
        return {"_target_": "monai.networks.nets.ViT", "in_channels": 1, "img_size": m.size,
                "patch_size": m.patch_size, "hidden_size": m.hidden_size, "mlp_dim": m.mlp_dim,
                "num_layers": m.num_layers, "num_heads": m.num_heads, "classification": False, "spatial_dims": 3}
    if m.backbone == "swin":  # what MONAI's SwinUNETR builds as its `swinViT` from the same sizes
        return {"_target_": "monai.networks.nets.swin_unetr.SwinTransformer", "in_chans": 1,
                "embed_dim": m.swin_feature_size, "window_size": [m.swin_window_size] * 3, "patch_size": [2, 2, 2],
                "depths": list(m.swin_depths), "num_heads": list(m.swin_num_heads), "spatial_dims": 3}
    return {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
            "block_inplanes": list(m.resnet_widths), "spatial_dims": 3, "n_input_channels": 1, "conv1_t_size": 3,
            "conv1_t_stride": 1, "no_max_pool": True, "feed_forward": False, "num_classes": 1}


# What the bundle's card gives to embed preprocessed cubes as the pipeline does (VolumeEncoder's
# forward) with MONAI alone; `FOLDER` is the bundle's path.
EXPORT_SNIPPET = '''import torch
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config(f"{FOLDER}/configs/inference.json")
network = parser.get_parsed_content("network_def").eval()
network.load_state_dict(torch.load(f"{FOLDER}/models/model.pt", weights_only=True), strict=True)

@torch.no_grad()
def embed(images):
    """images: float32 [n, 1, size, size, size], preprocessed as configs/metadata.json says."""
    out = network(torch.as_tensor(images, dtype=torch.float32))
    if isinstance(out, list):  # a Swin Transformer's five stages: the deepest, mean-pooled
        return out[-1].flatten(2).mean(dim=2)
    return out[0].mean(dim=1) if isinstance(out, tuple) else out  # a ViT's tokens are mean-pooled
'''


def build_vit(cfg: DomainConfig, shards_dir: Path) -> VolumeEncoder:
    """MONAI's ViT on the model cube, patch tokens without a class token."""
    from monai.networks.nets import ViT

    return _with_base_checkpoint(VolumeEncoder(cfg.model, ViT(**_arguments(cfg.model)), cfg.model.hidden_size), cfg)


def build_resnet(cfg: DomainConfig, shards_dir: Path) -> VolumeEncoder:
    """MONAI's 3D ResNet (one basic block per stage), globally pooled features."""
    from monai.networks.nets import ResNet

    return _with_base_checkpoint(VolumeEncoder(cfg.model, ResNet(**_arguments(cfg.model)),
                                               cfg.model.resnet_widths[-1]), cfg)


def _arguments(m: VolumeModelConfig) -> dict[str, Any]:
    return {k: v for k, v in network_def(m).items() if k != "_target_"}


def _with_base_checkpoint(encoder: VolumeEncoder, cfg: DomainConfig) -> VolumeEncoder:
    """`encoder` with the weights of `model.base_checkpoint`, when one is set (continued pretraining
    and the `generic` init), loaded strictly."""
    if cfg.model.base_checkpoint:
        load_backbone_weights(encoder.backbone, read_state(cfg.resolve(cfg.model.base_checkpoint)),
                              str(cfg.model.base_checkpoint))
    return encoder


# The parts of MONAI's networks around a ViT that a ViT backbone has no place for: ViTAutoEnc's
# decoder (the self-supervised tutorial's network, whose weights MONAI publishes) and UNETR's,
# which holds its ViT under `vit.`.
AUTOENCODER_DECODER = ("conv3d_transpose.", "conv3d_transpose_1.")


def backbone_tensors(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint as the backbone names them: without DataParallel's `module.`,
    a ViT out of UNETR (`vit.`) or ViTAutoEnc (its decoder left out)."""
    from monai.networks.nets import ViT

    state = dict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")
    if not isinstance(backbone, ViT):
        return state
    if any(name.startswith("vit.") for name in state):
        vit = {name.removeprefix("vit."): value for name, value in state.items() if name.startswith("vit.")}
        log.info("checkpoint: the ViT of a UNETR (`vit.`), %d tensors of its decoder left out", len(state) - len(vit))
        return vit
    decoder = [name for name in state if name.startswith(AUTOENCODER_DECODER)]
    if decoder:
        log.info("checkpoint: the ViT of a ViTAutoEnc, its decoder's %d tensors left out", len(decoder))
    return {name: value for name, value in state.items() if name not in decoder}


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint's tensors into `backbone`, strictly (MONAI's ViTAutoEnc, UNETR and ViT share
    `patch_embedding`, `blocks` and `norm`): one line naming what is missing, unexpected or of
    another shape."""
    from monai.networks.nets import ViT
    from monai.networks.nets.swin_unetr import SwinTransformer

    if isinstance(backbone, SwinTransformer):  # SwinUNETR's checkpoint layouts
        from ssl_models.medical3d.swin import load_swin_weights

        return load_swin_weights(backbone, state, source)
    kind = "vit" if isinstance(backbone, ViT) else "resnet"
    load_checkpoint_strictly(backbone, backbone_tensors(state, backbone), source, f"the {kind} backbone",
                             f"set model.backbone and its sizes (model.size, patch_size, hidden_size, num_layers, "
                             f"mlp_dim; resnet_widths) to the checkpoint's")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.base_checkpoint`: a .safetensors file, or a torch state dict that
    torch.load(weights_only=True) reads, also nested under "state_dict" or "model" as training
    checkpoints and MONAI's published SSL weights nest it (a pickle of anything else is never loaded)."""
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} not found; set model.base_checkpoint to a local file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            reason = " ".join(str(error).split())
            raise PipelineError(f"checkpoint {path} is not a safetensors file ({reason}); it was not loaded") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        # torch's own message advises weights_only=False, which would run the pickle's code: not repeated
        raise PipelineError(f"checkpoint {path} is not a weights-only checkpoint (or is damaged); it was not "
                            "loaded (give a .safetensors file, or a state dict of tensors saved with "
                            "torch.save)") from None
    if isinstance(state, dict):
        state = next((state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict):
        raise PipelineError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors; "
                            "give a MONAI network's state_dict() or a .safetensors file")
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def saved_model(pretrained_dir: Path) -> VolumeModelConfig:
    """The model section a pretrained encoder was saved with (`VolumeEncoder.save`)."""
    if not (pretrained_dir / CONFIG).exists():
        raise PipelineError(f"no pretrained encoder in {pretrained_dir}; run the pretrain stage first")
    return parse_section(VolumeModelConfig, json.loads((pretrained_dir / CONFIG).read_text()),
                         str(pretrained_dir / CONFIG))


def load_saved_weights(backbone: nn.Module, pretrained_dir: Path) -> None:
    """The weights `VolumeEncoder.save` wrote, into `backbone`."""
    load_backbone_weights(backbone, load_file(str(pretrained_dir / WEIGHTS)), str(pretrained_dir))
