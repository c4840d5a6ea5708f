"""Typed settings of the 3D medical domain (the `ingest`, `preprocess`, `model` and
`default_data` sections of its params.yaml block), and its method registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_models.core.config import require
from ssl_models.core.registry import Registry

# Lazy entries: validating a method name never imports torch or MONAI.
VOLUME_METHODS: Registry[type] = Registry("3D SSL method")
VOLUME_METHODS.register_lazy("vit_inpainting_contrastive", "ssl_models.medical3d.methods:InpaintingContrastive")
VOLUME_METHODS.register_lazy("mae", "ssl_models.medical3d.methods:MaskedAutoencoder3D")
VOLUME_METHODS.register_lazy("simclr", "ssl_models.medical3d.methods:SimCLR3D")
VIT_METHODS = ("vit_inpainting_contrastive", "mae")
BACKBONES = ("vit", "resnet")


@dataclass
class VolumeIngestConfig:
    min_slices: int = 8  # a volume needs this many slices along each axis; fewer is a 2D image
    nifti_modality: str = "auto"  # auto | ct | mr: NIfTI/NRRD carry no modality; auto: CT when values reach HU of air
    slice_gap_tolerance: float = 0.5  # a gap above (1 + this) x the usual slice spacing is a missing slice

    def validate(self, where: str) -> None:
        require(self.min_slices >= 1, where, "min_slices must be at least 1")
        require(self.nifti_modality in ("auto", "ct", "mr"), where,
                 f"nifti_modality {self.nifti_modality!r} is not one of auto, ct, mr")
        require(self.slice_gap_tolerance > 0, where, "slice_gap_tolerance must be positive")


@dataclass
class VolumePreprocessConfig:
    spacing: list[float] | None = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm; null keeps each volume's
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # HU clipped and scaled to [0, 1]
    mr_normalisation: str = "percentile"  # percentile (1st-99th to [0, 1]) | zscore (nonzero voxels)
    mr_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    crop_foreground: bool = True
    foreground_threshold: float = 0.05  # after normalisation, voxels above this are foreground

    def validate(self, where: str) -> None:
        require(self.spacing is None or (len(self.spacing) == 3 and min(self.spacing) > 0), where,
                 "spacing must be null or three positive millimetre values")
        require(len(self.ct_window) == 2 and self.ct_window[0] < self.ct_window[1], where,
                 "ct_window must be [low, high] in HU")
        require(self.mr_normalisation in ("percentile", "zscore"), where,
                 f"mr_normalisation {self.mr_normalisation!r} is not one of percentile, zscore")
        require(len(self.mr_percentiles) == 2 and 0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100,
                 where, "mr_percentiles must be [low, high] within 0..100")


@dataclass
class VolumeModelConfig:
    backbone: str = "vit"  # vit (MONAI ViT) | resnet (MONAI 3D ResNet)
    size: int = 32  # voxels per side of the model's input cube
    patch_size: int = 8  # ViT
    hidden_size: int = 96  # ViT width
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 192
    resnet_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    base_checkpoint: str | None = None  # a local state dict (e.g. MONAI's published ViT SSL weights)

    def validate(self, where: str) -> None:
        require(self.backbone in BACKBONES, where, f"backbone {self.backbone!r} is not one of {list(BACKBONES)}")
        require(self.size % self.patch_size == 0, where, "size must be a multiple of patch_size")
        require(self.hidden_size % self.num_heads == 0, where, "hidden_size must be a multiple of num_heads")
        require(len(self.resnet_widths) == 4, where, "resnet_widths lists four stage widths")


@dataclass
class MniDefaultConfig:
    """The embedded default: cubes cut from nilearn's MNI152 T1 template, labeled by the
    tissue that dominates them in nilearn's grey/white-matter probability maps."""

    crop_size: int = 24  # voxels (1 mm) per side; crops do not overlap, so no voxel is in two splits
    block_size: int = 48  # mm; crops in one block share a `group`, so test regions are never trained on
    min_brain_fraction: float = 0.5
    extra_volumes: bool = True  # also lay out the other registry volumes (pydicom, nibabel) for pretraining

    def validate(self, where: str) -> None:
        require(self.crop_size >= 8 and self.block_size >= self.crop_size, where,
                 "crop_size must be >= 8 and block_size >= crop_size")
