"""Histopathology: whole-slide images and tiles, tissue-aware tiling into Arrow shards,
stain-aware SSL on patches (SimCLR/DCL, VICReg, BYOL, MAE) with small ResNet or ViT backbones."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ssl_models.core.config import DomainConfig, SplitConfig, parse_section
from ssl_models.core.domain import DOMAINS, Domain, Record, Rejected, Source
from ssl_models.core.errors import PipelineError
from ssl_models.histopathology.config import (
    HISTO_METHODS,
    HistoDefaultConfig,
    HistoIngestConfig,
    HistoModelConfig,
    HistoPreprocessConfig,
    split_options,
)
from ssl_models.histopathology.readers import HISTO_SUFFIXES, read_slide

if TYPE_CHECKING:
    from datasets import Dataset

    from ssl_models.core.modules import Encoder, PretrainMethod

# torch, timm, lightly, datasets and OpenSlide are imported by the methods that need them,
# so default_data and ingest start fast.
log = logging.getLogger(__name__)


def block_split(unit: str, split: SplitConfig) -> str:
    """train / val / test from a hash of a spatial block's id: the same rule as ingest's
    (`tasks.splits.assign_split`), which this layer may not import."""
    position = int(hashlib.sha256(f"{split.salt}:{unit}".encode()).hexdigest()[:12], 16) / 16**12
    if position < split.test:
        return "test"
    return "val" if position < split.test + split.val else "train"


@DOMAINS.register("histopathology")
class Histopathology(Domain):
    name = "histopathology"
    suffixes = HISTO_SUFFIXES

    def _sections(self, cfg: DomainConfig) -> tuple[HistoPreprocessConfig, HistoModelConfig]:
        where = f"domains.{cfg.name}"
        return (parse_section(HistoPreprocessConfig, cfg.preprocess, f"{where}.preprocess"),
                parse_section(HistoModelConfig, cfg.model, f"{where}.model"))

    def _set_threads(self, model_cfg: HistoModelConfig) -> None:
        import torch

        if model_cfg.torch_threads:
            torch.set_num_threads(model_cfg.torch_threads)

    def validate(self, cfg: DomainConfig) -> None:
        where = f"domains.{cfg.name}"
        parse_section(HistoIngestConfig, cfg.ingest, f"{where}.ingest")
        parse_section(HistoDefaultConfig, cfg.default_data, f"{where}.default_data")
        preprocess, model = self._sections(cfg)
        HISTO_METHODS.check(cfg.pretrain.method)
        split_options(cfg.pretrain.options, f"{where}.pretrain.options")
        if cfg.pretrain.method == "mae" and model.backbone != "vit":
            raise PipelineError(f"params.yaml {where}: pretrain.method mae needs model.backbone: vit")
        if preprocess.labeled_unit == "slide" and preprocess.spatial_block:
            raise PipelineError(f"params.yaml {where}.preprocess: labeled_unit: slide keeps whole slides "
                                "together; spatial_block splits them: set one of the two")
        if model.backbone == "vit" and preprocess.stored_size % model.patch_size:
            raise PipelineError(f"params.yaml {where}: model.patch_size {model.patch_size} must divide the "
                                f"stored tile size {preprocess.stored_size} (tile_size * scale)")

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        options = parse_section(HistoIngestConfig, cfg.ingest, f"domains.{cfg.name}.ingest")
        yield read_slide(source, options.min_side)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> None:
        from ssl_models.histopathology.default_data import write_ihc_regions

        options = parse_section(HistoDefaultConfig, cfg.default_data, f"domains.{cfg.name}.default_data")
        counts = write_ihc_regions(out_dir, options)
        log.info("default histology corpus: %(regions)d IHC regions, %(dab_high)d labeled dab-high", counts)

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Callable[[dict[str, Any]], Source] | None = None) -> dict[str, Any]:
        from ssl_models.histopathology.shards import write_tile_shards

        options, _ = self._sections(cfg)
        if locate is None:  # before the manifest named sources: rows carried their file
            locate = lambda row: Source(row["key"], [cfg.corpus / row.get("file", row["key"])])  # noqa: E731
        return write_tile_shards(manifest, locate, options, lambda unit: block_split(unit, cfg.split), out_dir)

    def pretrain_dataset(self, shards_dir: Path, split: str) -> Dataset:
        from datasets import load_from_disk

        return load_from_disk(str(shards_dir / f"pretrain_{split}"))

    def build_pretrain_method(self, cfg: DomainConfig, shards_dir: Path) -> PretrainMethod:
        from ssl_models.histopathology.backbones import build_backbone, load_weights

        preprocess, model_cfg = self._sections(cfg)
        self._set_threads(model_cfg)
        augment, method_options = split_options(cfg.pretrain.options, f"domains.{cfg.name}.pretrain.options")
        backbone = build_backbone(model_cfg, preprocess.stored_size)
        if model_cfg.init_checkpoint:
            load_weights(backbone, Path(model_cfg.init_checkpoint))
        method_cls = HISTO_METHODS.get(cfg.pretrain.method)
        try:
            method = method_cls(backbone, augment, **method_options)
        except TypeError as error:
            raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.options do not fit method "
                                f"{cfg.pretrain.method!r}: {error}") from None
        method.model_cfg, method.image_size = model_cfg, preprocess.stored_size
        return method

    def save_pretrained(self, method: PretrainMethod, out_dir: Path) -> None:
        from ssl_models.histopathology.backbones import save_backbone

        save_backbone(method.backbone, method.model_cfg, method.image_size, out_dir)

    def load_encoder(self, init: str, cfg: DomainConfig, shards_dir: Path,
                     pretrained_dir: Path, seed: int) -> Encoder:
        from ssl_models.histopathology.backbones import load_tile_encoder

        preprocess, model_cfg = self._sections(cfg)
        self._set_threads(model_cfg)
        return load_tile_encoder(init, model_cfg, preprocess.stored_size, pretrained_dir, seed)

    def available_inits(self, cfg: DomainConfig) -> list[str]:
        return ["ssl", "scratch", "generic"] if self._sections(cfg)[1].init_checkpoint else ["ssl", "scratch"]

    def task_description(self, cfg: DomainConfig, uses_default_data: bool) -> str:
        preprocess, _ = self._sections(cfg)
        if uses_default_data:
            from ssl_models.histopathology.default_data import ATTRIBUTION

            options = parse_section(HistoDefaultConfig, cfg.default_data, f"domains.{cfg.name}.default_data")
            return (f"IHC DAB grading on one real image, cut into {options.region_size}-pixel regions: a region is "
                    f"`dab-high` when at least {options.high_fraction:.0%} of its stained pixels carry DAB by colour "
                    "deconvolution, else `dab-low`; each tile carries its region's label (weak, region-level "
                    "labels, as slide labels are). The labels come from that rule, not from a pathologist, so the "
                    "task shows whether pretraining helps encode stain and texture, not diagnostic value. Regions "
                    "are the split unit: test tiles come from regions never seen in pretraining or training. "
                    + ATTRIBUTION)
        unit = ("slides (mean of their tiles' embeddings)" if preprocess.labeled_unit == "slide"
                else "tiles, each labeled with its slide's label")
        splits = (f"spatial blocks of {preprocess.spatial_block} pixels (test tiles come from regions "
                  "never trained on)" if preprocess.spatial_block else "slide or labels-CSV group")
        return f"classification of {unit} by the `label` column of {cfg.labels}; split by {splits}"
