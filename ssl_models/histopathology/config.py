"""Settings of the histopathology domain's params.yaml sections, its SSL methods (each with its
options) and its backbones.

Kept free of torch so every stage validates the whole block in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ssl_models.core.config import IngestLimits, ParallelWork, require
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from ssl_models.core.modules import Encoder, PretrainMethod


@dataclass
class HistoIngestConfig(IngestLimits):
    """`ingest:` block: which slides are too small to tile."""

    min_side: int = 8  # pixels at level 0; smaller images are quarantined
    # width x height x bands a level may decode whole, read from the header before decoding (tiles,
    # plain TIFFs, the level a slide's thumbnail comes from; OpenSlide reads tiles by region):
    # 2^28 is Pillow's own decompression-bomb scale, 256 MiB of 8-bit samples
    max_pixels: int = 2 ** 28

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.min_side >= 1, f"{where}.min_side", "must be at least 1 pixel")
        require(self.max_pixels >= 3 * self.min_side ** 2, f"{where}.max_pixels",
                "must allow at least an RGB image of min_side x min_side pixels")


@dataclass
class HistoPreprocessConfig(ParallelWork):
    """`preprocess:` block: tiling, tissue and pen-mark rejection, stain normalisation, splits."""

    level: int = 0  # pyramid level to tile (the slide's last level when it has fewer)
    tile_size: int = 32  # pixels at `level`; tiles are stored at `tile_size * scale`
    scale: float = 1.0  # resize factor after reading, e.g. 0.5 turns 20x tiles into 10x
    stride: int | None = None  # pixels at `level`; default: tile_size (no overlap)
    thumbnail_size: int = 1024  # longest side of the thumbnail the tissue mask is computed on
    min_tissue_saturation: float = 0.05  # Otsu's threshold on saturation is clipped into
    max_tissue_saturation: float = 0.1   # [min, max]: glass is below, every stain above
    min_tissue_fraction: float = 0.5  # tiles with less tissue are rejected as background
    max_pen_fraction: float = 0.1  # tiles with more pen-ink pixels are rejected as pen marks
    stain_normalisation: Literal["none", "macenko"] = "none"  # macenko: per source, to a fixed H&E reference
    max_tiles_per_source: int = 400  # evenly spaced subset of a slide's tissue tiles
    spatial_block: int | None = None  # pixels at `level`: split and group by spatial block of a
    # slide, so test tiles come from regions never trained on (tissue-of-origin tasks)
    labeled_unit: Literal["tile", "slide"] = "tile"  # tile: patch-level labels; slide: one mean-pooled row per slide
    max_tiles_per_slide_bag: int = 16  # tiles per slide row when labeled_unit: slide

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.level >= 0, f"{where}.level", "must be >= 0")
        require(self.tile_size >= 8, f"{where}.tile_size", "must be at least 8 pixels")
        require(0 < self.scale <= 1, f"{where}.scale", "must be in (0, 1]")
        require(self.stored_size >= 8, f"{where}.scale", "tile_size * scale must be at least 8 pixels")
        require(self.stride is None or self.stride > 0, f"{where}.stride", "must be positive or null")
        require(self.thumbnail_size >= 16, f"{where}.thumbnail_size", "must be at least 16 pixels")
        for name in ("min_tissue_saturation", "max_tissue_saturation", "min_tissue_fraction", "max_pen_fraction"):
            require(0 <= getattr(self, name) <= 1, f"{where}.{name}", "must be in [0, 1]")
        require(self.min_tissue_saturation <= self.max_tissue_saturation, f"{where}.min_tissue_saturation",
                "must not exceed max_tissue_saturation")
        require(self.max_tiles_per_source > 0, f"{where}.max_tiles_per_source", "must be positive")
        require(self.max_tiles_per_slide_bag > 0, f"{where}.max_tiles_per_slide_bag", "must be positive")
        require(self.spatial_block is None or self.spatial_block >= self.tile_size, f"{where}.spatial_block",
                "must be at least tile_size, or null")
        require(not (self.labeled_unit == "slide" and self.spatial_block), f"{where}.spatial_block",
                "labeled_unit: slide keeps whole slides together; spatial_block splits them: set one of the two")

    @property
    def stored_size(self) -> int:
        return round(self.tile_size * self.scale)


@dataclass
class HistoModelConfig:
    """`model:` block: the backbone and where its weights start."""

    backbone: Literal["resnet", "vit"] = "resnet"  # small timm ResNet | small timm ViT (needed by mae)
    width: int = 16  # resnet: channels of the first stage (doubled per stage); vit: embed_dim = 4 * width
    depth: int = 1  # resnet: blocks per stage; vit: transformer blocks
    stem_stride: int = 2  # resnet: stride of the 3x3 stem (1 keeps full resolution, 4x the cost)
    patch_size: int = 4  # vit only
    num_heads: int = 4  # vit only
    base_checkpoint: str | None = None  # local .safetensors of the same backbone to start from;
    # it is also the `generic` init in finetune

    def validate(self, where: str) -> None:
        require(self.width >= 4, f"{where}.width", "must be at least 4")
        for name in ("depth", "stem_stride", "patch_size", "num_heads"):
            require(getattr(self, name) >= 1, f"{where}.{name}", "must be positive")
        require(self.backbone != "vit" or (4 * self.width) % self.num_heads == 0, f"{where}.num_heads",
                "vit: must divide the embedding size 4 * width")


@dataclass
class HistoDefaultConfig:
    """`default_data:` block: the embedded IHC image cut into labeled regions."""

    region_size: int = 64  # pixels of each corpus image (one region of the IHC image)
    dab_threshold: float = 0.05  # DAB optical density of a brown pixel (skimage.color.rgb2hed)
    high_fraction: float = 0.85  # regions whose tissue is at least this share brown are `dab-high`

    def validate(self, where: str) -> None:
        require(16 <= self.region_size <= 512, f"{where}.region_size", "must be 16 to 512 pixels (the image's size)")
        require(0 < self.high_fraction <= 1, f"{where}.high_fraction", "must be in (0, 1]")


@dataclass
class AugmentConfig:
    """Pathology views (`pretrain.options.augment`). mae uses only rotate90, flip and hed_jitter."""

    hed_jitter: float = 0.05  # HED stain jitter strength (Tellez et al. 2018)
    rotate90: bool = True
    flip: bool = True
    crop_scale: float = 0.6  # smallest area share of the random resized crop
    blur_probability: float = 0.2
    blur_sigma: float = 0.8  # pixels
    batch_styles_standardization: bool = False  # Fourier amplitude swap within a batch (BSS)
    bss_low_frequency: float = 0.1  # share of the spectrum whose amplitude is swapped

    def validate(self, where: str) -> None:
        require(self.hed_jitter >= 0, f"{where}.hed_jitter", "must be >= 0")
        require(self.blur_sigma >= 0, f"{where}.blur_sigma", "must be >= 0")
        require(0 < self.crop_scale <= 1, f"{where}.crop_scale", "must be in (0, 1]")
        require(0 < self.bss_low_frequency <= 1, f"{where}.bss_low_frequency", "must be in (0, 1]")
        require(0 <= self.blur_probability <= 1, f"{where}.blur_probability", "must be in [0, 1]")


@dataclass
class SimCLROptions:
    loss: Literal["ntxent", "dcl"] = "ntxent"  # dcl: decoupled contrastive, better with small batches
    temperature: float = 0.2
    projection_dim: int = 64
    # BatchNorm in the projection head; off only where a run must not depend on how the
    # batch is split: on the CPU each process normalises its own share (SyncBatchNorm needs GPUs)
    head_batch_norm: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        require(self.temperature > 0, f"{where}.temperature", "must be positive")
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be positive")


@dataclass
class VICRegOptions:
    projection_dim: int = 128
    head_batch_norm: bool = True  # BatchNorm in the heads (see SimCLROptions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be positive")


@dataclass
class BYOLOptions:
    momentum: float = 0.99  # of the EMA teacher
    projection_dim: int = 64
    head_batch_norm: bool = True  # BatchNorm in the heads (see SimCLROptions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        require(0 <= self.momentum < 1, f"{where}.momentum", "must be in [0, 1)")
        require(self.projection_dim >= 1, f"{where}.projection_dim", "must be positive")


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75  # share of the patches hidden from the encoder
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, where: str) -> None:
        require(0 < self.mask_ratio < 1, f"{where}.mask_ratio", "must be in (0, 1)")
        require(self.decoder_depth >= 1, f"{where}.decoder_depth", "must be positive")
        require(self.decoder_heads >= 1, f"{where}.decoder_heads", "must be positive")
        require(self.decoder_dim >= 1 and self.decoder_dim % self.decoder_heads == 0, f"{where}.decoder_dim",
                "must be a positive multiple of decoder_heads")


METHODS: Registry[type[PretrainMethod]] = Registry("histopathology SSL method")
METHODS.register_lazy("simclr", "ssl_models.histopathology.methods:SimCLR", options=SimCLROptions)
METHODS.register_lazy("vicreg", "ssl_models.histopathology.methods:VICReg", options=VICRegOptions)
METHODS.register_lazy("byol", "ssl_models.histopathology.methods:BYOL", options=BYOLOptions)
METHODS.register_lazy("mae", "ssl_models.histopathology.methods:MAE", options=MAEOptions)
METHODS.register_lazy("barlow_twins", "ssl_models.histopathology.barlow_twins:BarlowTwins",
                      options="ssl_models.histopathology.barlow_twins:BarlowTwinsOptions")
METHODS.register_lazy("dino", "ssl_models.histopathology.dino:DINO", options="ssl_models.histopathology.dino:DINOOptions")

BACKBONES: Registry[Callable[..., Encoder]] = Registry("histopathology backbone")
BACKBONES.register_lazy("resnet", "ssl_models.histopathology.backbones:build_resnet")
BACKBONES.register_lazy("vit", "ssl_models.histopathology.backbones:build_vit")


# The domain's params.yaml sections, each parsed and checked by `load_config` before any stage runs.
SECTIONS = {"ingest": HistoIngestConfig, "preprocess": HistoPreprocessConfig, "model": HistoModelConfig,
            "default_data": HistoDefaultConfig}
