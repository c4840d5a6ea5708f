"""MONAI's SwinUNETR self-supervised recipe (Tang et al., "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", CVPR 2022): the `swin` backbone (SwinUNETR's encoder,
its `swinViT`) and the `swin_ssl` method, after `SSLHead` and the training loop of MONAI's
research-contributions/SwinUNETR/Pretrain, with MONAI blocks.

Each volume is rotated twice by a multiple of 90 degrees in one plane (`rot_rand`) and each rotation
has random boxes replaced by noise (`aug_rand`'s `patch_rand_drop`, here MONAI's RandCoarseDropout
filling with values drawn within the volume's range). From the deepest Swin stage the network
predicts the rotation (4 classes, cross-entropy), reconstructs the rotated volume under the noise
(L1: inpainting) and pulls the two views together against the rest of the global batch (NT-Xent,
lightly's, gathered across processes: world-size invariant like every method here). Departures,
each for a 32-voxel cube: the deepest stage of such a cube is one voxel, so the rotation and
contrastive heads read its mean-pooled features (SSLHead reads its first and second token, which a
96-voxel crop has), and the reconstruction decoder (SSLHead's "vae" one) has no instance norm in its
first stage, which would have nothing to normalise over one voxel. `aug_rand`'s second pass, pasting
boxes of another volume of the batch, is left out: a process holds only its share of the batch, so
it would depend on the split.

Checkpoints: `model.base_checkpoint` may be a SwinUNETR or SSLHead state dict (`swinViT.` keys, the
decoder and heads left out), MONAI's published `model_swinvit.pt` (under "state_dict", `module.`
prefixes, the MLP named `fc1` / `fc2` as `SwinTransformerBlock.load_from` reads it) or this
backbone's own; all load strictly. The export is the bare `SwinTransformer` (`network_def`), whose
tensors are SwinUNETR's `swinViT.` ones: `SwinUNETR(...).swinViT.load_state_dict(...)` takes them; its
`models/model_swinvit.pt` holds them in the published layout, which `SwinUNETR(...).load_from` takes.

Registered in config.py: `BACKBONES.register_lazy("swin", ...:build_swin)`,
`METHODS.register_lazy("swin_ssl", ...:SwinSSL, options=...:SwinSSLOptions)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightly.loss import NTXentLoss
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ssl_models.core.config import DomainConfig, require
from ssl_models.core.domain import load_checkpoint_strictly
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, generator
from ssl_models.medical3d.backbones import VolumeEncoder, _arguments, _with_base_checkpoint
from ssl_models.medical3d.methods import _VolumeMethod
from ssl_models.medical3d.views import images_of

log = logging.getLogger(__name__)

HALVINGS = 5  # the patch embedding and the four stages' patch mergings halve the grid: the deepest is cube / 32
ROTATIONS = 4  # 0, 90, 180 and 270 degrees
ROTATION_PLANE = (2, 3)  # of a [1, D, H, W] volume: rot_rand's `x.rot90(k, (2, 3))`, about the first spatial axis


@dataclass
class SwinSSLOptions:
    """`swin_ssl`: the three weighted terms (the paper's and MONAI's weights are all 1)."""

    reconstruction_weight: float = 1.0  # L1 inpainting of the noised boxes
    rotation_weight: float = 1.0  # cross-entropy over the 4 rotations
    contrastive_weight: float = 1.0  # NT-Xent between the two views of a volume
    temperature: float = 0.5  # MONAI's `Contrast` loss
    projection_dim: int = 512  # SSLHead's contrastive head
    max_dropped: float = 0.3  # patch_rand_drop's `max_drop`: at most this share of voxels noised (on average)

    def validate(self, where: str) -> None:
        for name in ("reconstruction_weight", "rotation_weight", "contrastive_weight"):
            require(getattr(self, name) >= 0, f"{where}.{name}", "must be zero or positive")
        require(self.reconstruction_weight + self.rotation_weight + self.contrastive_weight > 0, where,
                "at least one of reconstruction_weight, rotation_weight and contrastive_weight must be positive")
        require(self.temperature > 0, f"{where}.temperature", "must be positive")
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be at least 1")
        require(0 < self.max_dropped < 1, f"{where}.max_dropped", "must be in (0, 1)")


# --- the backbone -------------------------------------------------------------------------------

class SwinEncoder(VolumeEncoder):
    """SwinUNETR's Swin Transformer; a volume's features are the mean of its deepest stage (layer-
    normalised, as SwinUNETR reads it), 16 x swin_feature_size of them."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(batch["image"])[-1].flatten(2).mean(dim=2)


def build_swin(cfg: DomainConfig, shards_dir: Path) -> SwinEncoder:
    """MONAI's `SwinTransformer` as SwinUNETR builds it (`network_def`), from `model.base_checkpoint`
    when one is set."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    backbone = SwinTransformer(**_arguments(cfg.model))
    return _with_base_checkpoint(SwinEncoder(cfg.model, backbone, cfg.model.swin_feature_size * 2 ** 4), cfg)


def swin_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as the bare `SwinTransformer` names them: DataParallel's `module.`
    dropped; of a SwinUNETR or an SSLHead only the `swinViT.` part; the MLP of MONAI's published
    weights (`fc1`, `fc2`) named as MONAI's blocks name it now (`linear1`, `linear2`)."""
    state = dict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")
    if any(name.startswith("swinViT.") for name in state):
        encoder = {name.removeprefix("swinViT."): value for name, value in state.items()
                   if name.startswith("swinViT.")}
        if len(encoder) < len(state):
            log.info("checkpoint: the swinViT of a SwinUNETR or SSLHead, %d tensors of its decoder or heads left "
                     "out", len(state) - len(encoder))
        state = encoder
    return {name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2."): value
            for name, value in state.items()}


def published_layout(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The bare `SwinTransformer`'s tensors as MONAI publishes SwinUNETR's self-supervised weights
    (`model_swinvit.pt`): under "state_dict", each name with `module.`, the MLP's layers `fc1` / `fc2`,
    which `SwinUNETR.load_from` reads (MONAI's fine-tuning tutorials start from it). `swin_tensors`
    reads it back."""
    return {"state_dict": {f"module.{name}".replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."):
                           value for name, value in state.items()}}


def load_swin_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint's tensors into the Swin backbone strictly, or one line naming what is missing,
    unexpected or of another shape."""
    load_checkpoint_strictly(backbone, swin_tensors(state), source, "the swin backbone",
                             "set model.swin_feature_size, swin_depths, swin_num_heads and swin_window_size to the "
                             "checkpoint's (MONAI's published SwinUNETR weights: 48, [2, 2, 2, 2], [3, 6, 12, 24], 7)")


# --- the data side ------------------------------------------------------------------------------

def noise_boxes(size: int, max_dropped: float):
    """patch_rand_drop with MONAI's RandCoarseDropout: boxes of 1/16 to 1/4 of the cube's side filled
    with noise within the volume's range, as many as cover up to `max_dropped` of it (half on average)."""
    from monai.transforms import RandCoarseDropout

    smallest, largest = max(1, size // 16), max(2, size // 4)
    mean_box = ((smallest + largest) / 2) ** 3
    return RandCoarseDropout(holes=1, max_holes=max(1, round(max_dropped * size ** 3 / mean_box)),
                             spatial_size=smallest, max_spatial_size=largest, fill_value=None, prob=1.0)


@dataclass
class RotatedNoisedViews(DataSide):
    """Per volume, two views: `targets` [B, 2, 1, S, S, S] (the volume rotated by `rotations` [B, 2]
    quarter turns) and `views` (the same with noised boxes). The rotations come from a generator of the
    volume's seed, the boxes from the MONAI transform reseeded with it."""

    boxes: Any  # RandCoarseDropout on [1, S, S, S]

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        from monai.utils import convert_to_tensor

        targets, views, rotations = [], [], []
        for image, seed in zip(images_of(rows), seeds):
            # from uniform draws: torch.randint's first draws of a fresh generator repeat across seeds
            turns = (torch.rand(2, generator=generator(seed)) * ROTATIONS).long()
            self.boxes.set_random_state(seed=seed % 2**32)
            rotated = [torch.rot90(image, int(k), dims=ROTATION_PLANE).contiguous() for k in turns]
            targets.append(torch.stack(rotated))
            views.append(torch.stack([convert_to_tensor(self.boxes(view.clone()), dtype=torch.float32,
                                                        track_meta=False) for view in rotated]))
            rotations.append(turns)
        return {"targets": torch.stack(targets), "views": torch.stack(views), "rotations": torch.stack(rotations)}


# --- the method ---------------------------------------------------------------------------------

def reconstruction_decoder(channels: int, stages: int, deepest_side: int) -> nn.Sequential:
    """SSLHead's "vae" decoder with MONAI blocks: `stages` times a 3x3x3 convolution, instance norm,
    LeakyReLU and x2 trilinear upsampling (channels halved, down to 1/16), then a 1x1x1 convolution to
    the one image channel. Instance norm is left out where the grid is one voxel (the deepest stage of
    a 32-voxel cube): it would have nothing to normalise over."""
    from monai.networks.blocks import Convolution, UpSample

    layers: list[nn.Module] = []
    side, width = deepest_side, channels
    for stage in range(stages):
        out = max(1, channels // 2 ** min(stage + 1, 4))
        normed = side > 1  # a bias before instance norm is removed by it: none (its gradient would be rounding noise)
        layers += [Convolution(3, width, out, kernel_size=3, norm="instance" if normed else None, act="leakyrelu",
                               bias=not normed),
                   UpSample(3, scale_factor=2, mode="nontrainable", interp_mode="trilinear", align_corners=False,
                            pre_conv=None)]
        side, width = 2 * side, out
    layers.append(Convolution(3, width, 1, kernel_size=1, conv_only=True))
    return nn.Sequential(*layers)


class SwinSSL(_VolumeMethod):
    """SwinUNETR's pretraining: inpainting, rotation prediction and contrast on the Swin backbone's
    deepest stage (module docstring), weighted by the options."""

    def __init__(self, encoder: VolumeEncoder, options: SwinSSLOptions) -> None:
        super().__init__(encoder, options)
        cfg = encoder.cfg
        if cfg.backbone != "swin":
            raise PipelineError(f"pretrain.method 'swin_ssl' trains SwinUNETR's encoder; set model.backbone: swin "
                                f"(not {cfg.backbone!r})")
        self.rotation_head = nn.Linear(encoder.dim, ROTATIONS)
        self.contrastive_head = nn.Linear(encoder.dim, options.projection_dim)
        self.decoder = reconstruction_decoder(encoder.dim, HALVINGS, cfg.size // 2 ** HALVINGS)
        self.contrastive = NTXentLoss(temperature=options.temperature, gather_distributed=True)

    def data_side(self) -> DataSide:
        return RotatedNoisedViews(noise_boxes(self.encoder().cfg.size, self.options.max_dropped))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # both views of every volume in one pass: [2B, 1, S, S, S], volume-major
        deepest = self.encoder().backbone(batch["views"].flatten(0, 1))[-1]
        pooled = deepest.flatten(2).mean(dim=2)
        rotation = nn.functional.cross_entropy(self.rotation_head(pooled), batch["rotations"].flatten())
        projected = self.contrastive_head(pooled).unflatten(0, (-1, 2))
        contrast = self.contrastive(projected[:, 0], projected[:, 1])
        reconstruction = nn.functional.l1_loss(self.decoder(deepest), batch["targets"].flatten(0, 1))
        options = self.options
        return (options.reconstruction_weight * reconstruction + options.rotation_weight * rotation
                + options.contrastive_weight * contrast)
