"""Typed settings of the 3D medical domain (the `ingest`, `preprocess`, `model` and
`default_data` sections of its params.yaml block), its SSL methods with their options, and
its backbones. Imports no torch: checking params.yaml stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ssl_models.core.config import IngestLimits, ParallelWork, require
from ssl_models.core.registry import Registry


@dataclass
class VolumeIngestConfig(IngestLimits):
    min_slices: int = 8  # a volume needs this many slices along each axis; fewer is a 2D image
    # NIfTI/NRRD carry no modality; auto: CT when values reach the HU of air
    nifti_modality: Literal["auto", "ct", "mr"] = "auto"
    slice_gap_tolerance: float = 0.5  # a gap above (1 + this) x the usual slice spacing is a missing slice
    # voxels a source may declare, every dimension counted (4D time points and channels, DICOM frames
    # and samples per pixel, all files of a series), checked on the header before any pixel is
    # decoded: 2^30 is a 4 GiB float32 volume, above any clinical CT or MR (512 x 512 x 2000 is 2^29)
    max_voxels: int = 2 ** 30

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.min_slices >= 1, f"{where}.min_slices", "must be at least 1")
        require(self.max_voxels >= self.min_slices ** 3, f"{where}.max_voxels",
                "must allow at least a volume of min_slices voxels along each axis")
        require(self.slice_gap_tolerance > 0, f"{where}.slice_gap_tolerance", "must be positive")


@dataclass
class VolumePreprocessConfig(ParallelWork):
    spacing: list[float] | None = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm; null keeps each volume's
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # HU clipped and scaled to [0, 1]
    mr_normalisation: Literal["percentile", "zscore"] = "percentile"  # 1st-99th to [0, 1] | z-score of nonzero voxels
    mr_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    crop_foreground: bool = True
    foreground_threshold: float = 0.05  # after normalisation, voxels above this are foreground

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.spacing is None or (len(self.spacing) == 3 and min(self.spacing) > 0), f"{where}.spacing",
                "must be null or three positive millimetre values")
        require(len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1], f"{where}.ct_window",
                "must be [low, high] in HU")
        require(len(self.mr_percentiles) == 2 and 0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100,
                f"{where}.mr_percentiles", "must be [low, high] within 0..100")


@dataclass
class VolumeModelConfig:
    # MONAI ViT | MONAI 3D ResNet | SwinUNETR's Swin Transformer encoder (the names BACKBONES registers)
    backbone: Literal["vit", "resnet", "swin"] = "vit"
    size: int = 32  # voxels per side of the model's input cube
    patch_size: int = 8  # ViT
    hidden_size: int = 96  # ViT width
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 192
    resnet_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    # swin: SwinUNETR's `swinViT` (2-voxel patches, four stages, each halving the grid). SwinUNETR's own
    # sizes are feature size 48 and window 7 on 96-voxel crops (its published SSL weights); a window of 4
    # tiles a 32-voxel cube's stage grids (16, 8, 4, 2) exactly, where 7 pads them (~30x the CPU time)
    swin_feature_size: int = 12  # channels of the first stage, doubled at each; a multiple of 12 (SwinUNETR's rule)
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # Swin blocks per stage
    swin_num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])  # attention heads per stage
    swin_window_size: int = 4  # voxels per side of an attention window
    base_checkpoint: str | None = None  # a local state dict (e.g. MONAI's published ViT SSL weights): init `generic`

    def validate(self, where: str) -> None:
        for name in ("size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            require(getattr(self, name) > 0, f"{where}.{name}", "must be positive")
        require(self.size % self.patch_size == 0, f"{where}.size", "must be a multiple of patch_size")
        require(self.hidden_size % self.num_heads == 0, f"{where}.hidden_size", "must be a multiple of num_heads")
        require(len(self.resnet_widths) == 4 and min(self.resnet_widths) > 0, f"{where}.resnet_widths",
                "lists four positive stage widths")
        require(self.swin_feature_size > 0 and self.swin_feature_size % 12 == 0, f"{where}.swin_feature_size",
                "must be a positive multiple of 12 (as MONAI's SwinUNETR requires)")
        require(len(self.swin_depths) == 4 and min(self.swin_depths) > 0, f"{where}.swin_depths",
                "lists four positive numbers of blocks")
        require(len(self.swin_num_heads) == 4 and min(self.swin_num_heads) > 0 and all(
            (self.swin_feature_size << stage) % heads == 0 for stage, heads in enumerate(self.swin_num_heads)),
                f"{where}.swin_num_heads", "lists four head counts, each dividing its stage's width "
                "(swin_feature_size doubled at each stage)")
        require(self.swin_window_size > 0, f"{where}.swin_window_size", "must be positive")
        if self.backbone == "swin":
            require(self.size % 32 == 0, f"{where}.size",
                    "must be a multiple of 32 for the swin backbone (SwinUNETR halves the grid five times)")


@dataclass
class MniDefaultConfig:
    """The embedded default: cubes cut from nilearn's MNI152 T1 template, labeled by the
    tissue that dominates them in nilearn's grey/white-matter probability maps."""

    crop_size: int = 24  # voxels (1 mm) per side; crops do not overlap, so no voxel is in two splits
    block_size: int = 48  # mm; crops in one block share a `group`, so test regions are never trained on
    min_brain_fraction: float = 0.5
    extra_volumes: bool = True  # also lay out the other registry volumes (pydicom, nibabel) for pretraining

    def validate(self, where: str) -> None:
        require(self.crop_size >= 8, f"{where}.crop_size", "must be at least 8 voxels")
        require(self.block_size >= self.crop_size, f"{where}.block_size", "must be at least crop_size")
        require(0 <= self.min_brain_fraction <= 1, f"{where}.min_brain_fraction", "must be in [0, 1]")


@dataclass
class MaeOptions:
    """`mae`: MONAI's MaskedAutoEncoderViT sharing the ViT backbone's weights."""

    masking_ratio: float = 0.75  # share of patches hidden from the encoder
    decoder_hidden_size: int = 48  # divisible by 6 (3D sin-cos position embedding) and by the 4 decoder heads
    decoder_layers: int = 1
    norm_pixel_loss: bool = True  # targets normalised per patch (mean, variance), as in the MAE paper

    def validate(self, where: str) -> None:
        require(0 < self.masking_ratio < 1, f"{where}.masking_ratio", "must be in (0, 1)")
        require(self.decoder_hidden_size > 0 and self.decoder_hidden_size % 12 == 0, f"{where}.decoder_hidden_size",
                "must be a positive multiple of 12 (6 for the sin-cos embedding, 4 decoder heads)")
        require(self.decoder_layers >= 1, f"{where}.decoder_layers", "must be at least 1")


@dataclass
class InpaintingContrastiveOptions:
    """`vit_inpainting_contrastive`: reconstruct corrupted views, plus NT-Xent between them."""

    contrastive_weight: float = 0.1  # weight of NT-Xent against the L1 reconstruction
    temperature: float = 0.5
    head_batch_norm: bool = True  # BatchNorm in the projection head (see SimCLROptions)

    def validate(self, where: str) -> None:
        require(self.contrastive_weight >= 0, f"{where}.contrastive_weight", "must be zero or positive")
        require(self.temperature > 0, f"{where}.temperature", "must be positive")


@dataclass
class SimCLROptions:
    """`simclr`: two augmented views, projection head and NT-Xent, on any backbone."""

    temperature: float = 0.2
    projection_dim: int = 64
    # BatchNorm in the projection head; off only where a run must not depend on how the batch is
    # split: on the CPU each process normalises its own share (SyncBatchNorm needs GPUs)
    head_batch_norm: bool = True

    def validate(self, where: str) -> None:
        require(self.temperature > 0, f"{where}.temperature", "must be positive")
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be at least 1")


# Lazy entries: validating a name never imports torch or MONAI.
METHODS: Registry[type] = Registry("3D SSL method")
METHODS.register_lazy("mae", "ssl_models.medical3d.methods:MaskedAutoencoder3D", options=MaeOptions)
METHODS.register_lazy("vit_inpainting_contrastive", "ssl_models.medical3d.methods:InpaintingContrastive",
                      options=InpaintingContrastiveOptions)
METHODS.register_lazy("simclr", "ssl_models.medical3d.methods:SimCLR3D", options=SimCLROptions)
METHODS.register_lazy("barlow_twins", "ssl_models.medical3d.barlow_twins:BarlowTwins3D",
                      options="ssl_models.medical3d.barlow_twins:BarlowTwinsOptions")
METHODS.register_lazy("dino", "ssl_models.medical3d.dino:DINO3D", options="ssl_models.medical3d.dino:DINOOptions")
METHODS.register_lazy("swin_ssl", "ssl_models.medical3d.swin:SwinSSL",
                      options="ssl_models.medical3d.swin:SwinSSLOptions")
VIT_METHODS = ("vit_inpainting_contrastive", "mae")  # they read the ViT's patch tokens

BACKBONES: Registry = Registry("3D backbone")
BACKBONES.register_lazy("vit", "ssl_models.medical3d.backbones:build_vit")
BACKBONES.register_lazy("resnet", "ssl_models.medical3d.backbones:build_resnet")
BACKBONES.register_lazy("swin", "ssl_models.medical3d.swin:build_swin")


# The domain's params.yaml sections, each parsed and checked by `load_config` before any stage runs.
SECTIONS = {"ingest": VolumeIngestConfig, "preprocess": VolumePreprocessConfig, "model": VolumeModelConfig,
            "default_data": MniDefaultConfig}
