"""Settings of the histopathology domain's params.yaml sections, and its method registry.

Kept free of torch so every stage validates the whole block in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ssl_models.core.config import parse_section
from ssl_models.core.errors import PipelineError
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from ssl_models.core.modules import PretrainMethod

HISTO_METHODS: Registry[type[PretrainMethod]] = Registry("histopathology SSL method")
HISTO_METHODS.register_lazy("simclr", "ssl_models.histopathology.methods:SimCLR")
HISTO_METHODS.register_lazy("vicreg", "ssl_models.histopathology.methods:VICReg")
HISTO_METHODS.register_lazy("byol", "ssl_models.histopathology.methods:BYOL")
HISTO_METHODS.register_lazy("mae", "ssl_models.histopathology.methods:MAE")

BACKBONES = ("resnet", "vit")


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise PipelineError(f"params.yaml {where}: {message}")


@dataclass
class HistoIngestConfig:
    """`ingest:` block: which slides are too small to tile."""

    min_side: int = 8  # pixels at level 0; smaller images are quarantined


@dataclass
class HistoPreprocessConfig:
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
    stain_normalisation: str = "none"  # none | macenko (per source, to a fixed H&E reference)
    max_tiles_per_source: int = 400  # evenly spaced subset of a slide's tissue tiles
    spatial_block: int | None = None  # pixels at `level`: split and group by spatial block of a
    # slide, so test tiles come from regions never trained on (tissue-of-origin tasks)
    labeled_unit: str = "tile"  # tile: patch-level labels; slide: one row per slide, mean-pooled
    max_tiles_per_slide_bag: int = 16  # tiles per slide row when labeled_unit: slide

    def validate(self, where: str) -> None:
        _require(self.tile_size >= 8 and self.level >= 0, where, "tile_size must be >= 8 and level >= 0")
        _require(0 < self.scale <= 1, where, "scale must be in (0, 1]")
        _require(self.stride is None or self.stride > 0, where, "stride must be positive")
        _require(round(self.tile_size * self.scale) >= 8, where, "tile_size * scale must be at least 8 pixels")
        _require(0 <= self.min_tissue_saturation <= self.max_tissue_saturation <= 1, where,
                 "need 0 <= min_tissue_saturation <= max_tissue_saturation <= 1")
        _require(0 <= self.min_tissue_fraction <= 1 and 0 <= self.max_pen_fraction <= 1, where,
                 "min_tissue_fraction and max_pen_fraction must be in [0, 1]")
        _require(self.stain_normalisation in ("none", "macenko"), where,
                 f"stain_normalisation {self.stain_normalisation!r} is not none or macenko")
        _require(self.labeled_unit in ("tile", "slide"), where, f"labeled_unit {self.labeled_unit!r} is not tile or slide")
        _require(self.max_tiles_per_source > 0 and self.max_tiles_per_slide_bag > 0, where,
                 "max_tiles_per_source and max_tiles_per_slide_bag must be positive")
        _require(self.spatial_block is None or self.spatial_block >= self.tile_size, where,
                 "spatial_block must be at least tile_size")

    @property
    def stored_size(self) -> int:
        return round(self.tile_size * self.scale)


@dataclass
class HistoModelConfig:
    """`model:` block: the backbone and where its weights start."""

    backbone: str = "resnet"  # resnet (small timm ResNet) | vit (small timm ViT)
    width: int = 16  # resnet: channels of the first stage (doubled per stage); vit: embed_dim = 4 * width
    depth: int = 1  # resnet: blocks per stage; vit: transformer blocks
    stem_stride: int = 2  # resnet: stride of the 3x3 stem (1 keeps full resolution, 4x the cost)
    patch_size: int = 4  # vit only
    num_heads: int = 4  # vit only
    init_checkpoint: str | None = None  # local .safetensors of the same backbone to start from;
    # it is also the `generic` init in finetune
    torch_threads: int | None = 1  # CPU threads for these small models (null: torch's default);
    # one thread is several times faster than two when other processes share the cores

    def validate(self, where: str) -> None:
        _require(self.backbone in BACKBONES, where, f"backbone {self.backbone!r} is not one of {list(BACKBONES)}")
        _require(self.width >= 4 and self.depth >= 1, where, "width must be >= 4 and depth >= 1")
        _require(self.torch_threads is None or self.torch_threads >= 1, where, "torch_threads must be positive or null")
        _require(self.backbone != "vit" or (4 * self.width) % self.num_heads == 0, where,
                 "vit: 4 * width must be divisible by num_heads")


@dataclass
class HistoDefaultConfig:
    """`default_data:` block: the embedded IHC image cut into labeled regions."""

    region_size: int = 64  # pixels of each corpus image (one region of the IHC image)
    dab_threshold: float = 0.05  # DAB optical density of a brown pixel (skimage.color.rgb2hed)
    high_fraction: float = 0.85  # regions whose tissue is at least this share brown are `dab-high`

    def validate(self, where: str) -> None:
        _require(self.region_size >= 16, where, "region_size must be at least 16 pixels")


@dataclass
class AugmentConfig:
    """Pathology views (pretrain.options.augment)."""

    hed_jitter: float = 0.05  # HED stain jitter strength (Tellez et al. 2018)
    rotate90: bool = True
    flip: bool = True
    crop_scale: float = 0.6  # smallest area share of the random resized crop
    blur_probability: float = 0.2
    blur_sigma: float = 0.8
    batch_styles_standardization: bool = False  # Fourier amplitude swap within a batch (BSS)
    bss_low_frequency: float = 0.1  # share of the spectrum whose amplitude is swapped

    def validate(self, where: str) -> None:
        _require(self.hed_jitter >= 0 and self.blur_sigma >= 0, where, "hed_jitter and blur_sigma must be >= 0")
        _require(0 < self.crop_scale <= 1 and 0 < self.bss_low_frequency <= 1, where,
                 "crop_scale and bss_low_frequency must be in (0, 1]")
        _require(0 <= self.blur_probability <= 1, where, "blur_probability must be in [0, 1]")


def split_options(options: dict[str, Any], where: str = "pretrain.options") -> tuple[AugmentConfig, dict[str, Any]]:
    """pretrain.options -> (augmentations, the method's own keyword arguments)."""
    options = dict(options or {})
    augment = parse_section(AugmentConfig, options.pop("augment", None), f"{where}.augment")
    return augment, options


