"""Histopathology: whole-slide images and tiles, tissue-aware tiling into Arrow shards,
stain-aware SSL on patches (SimCLR/DCL, VICReg, BYOL, MAE) with small ResNet or ViT backbones."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_models.core.config import DomainConfig, require
from ssl_models.core.domain import Domain, Locate, Record, Rejected, Source
from ssl_models.core.errors import PipelineError
from ssl_models.core.splits import assign_split
from ssl_models.histopathology.config import BACKBONES, METHODS, SECTIONS
from ssl_models.histopathology.readers import HISTO_SUFFIXES, read_slide

if TYPE_CHECKING:
    from ssl_models.core.modules import Encoder


class Histopathology(Domain, module="histopathology"):
    default_method = "simclr"
    name, suffixes, sections, methods, backbones = "histopathology", HISTO_SUFFIXES, SECTIONS, METHODS, BACKBONES
    baseline = "ssl_models.histopathology.baseline"
    # slide file names carry accession and case numbers (`S21-04711 A1.svs`): pseudonyms unless a
    # user sets privacy.pseudonymise: false
    pseudonymise_by_default = True
    # a slide to a chunk of tiling: a whole-slide image makes thousands of tiles (hundreds of MB),
    # held while they are written, and takes seconds to minutes to tile, beside which a chunk's
    # own cost (a result file, a round trip to a worker) is nothing
    preprocess_chunk_items = 1

    def splits_labeled_rows_at_preprocess(self, cfg: DomainConfig) -> bool:
        """With spatial blocks, tiles take their block's split in preprocess, not their slide's
        manifest split: ingest cannot tell which classes reach the train split."""
        return bool(cfg.preprocess.spatial_block)

    def gives_bags(self, cfg: DomainConfig) -> bool:
        """Slides (`preprocess.labeled_unit: slide`) are bags of tiles."""
        return cfg.preprocess.labeled_unit == "slide"

    def validate(self, cfg: DomainConfig) -> None:
        where = f"domains.{cfg.name}"
        require(cfg.pretrain.method != "mae" or cfg.model.backbone == "vit", f"{where}.pretrain.method",
                "mae needs model.backbone: vit")
        require(cfg.model.backbone != "vit" or cfg.preprocess.stored_size % cfg.model.patch_size == 0,
                f"{where}.model.patch_size", f"{cfg.model.patch_size} must divide the stored tile size "
                f"{cfg.preprocess.stored_size} (preprocess.tile_size * scale)")

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        yield read_slide(source, cfg.ingest.min_side, cfg.ingest.max_pixels)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        from ssl_models.histopathology.default_data import write_ihc_regions

        counts = write_ihc_regions(out_dir, cfg.default_data)
        return counts

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Locate) -> dict[str, Any]:
        from ssl_models.histopathology.shards import write_tile_shards

        split = cfg.split
        return write_tile_shards(manifest, locate, cfg.preprocess,
                                 lambda block: assign_split(block, split.val, split.test, split.salt), out_dir,
                                 cfg.ingest.max_pixels)

    def export(self, cfg: DomainConfig, encoder: Encoder, out_dir: Path) -> dict[str, Any]:
        """timm's `save_for_hf` layout: `model.safetensors` (the bare backbone, no head) and
        `config.json` (architecture, `model_args`, `pretrained_cfg` with the input size, mean and
        std), plus the tiling and stain settings under `ssl_pipeline_preprocessing`."""
        import json
        from dataclasses import asdict

        from safetensors.torch import save_file

        from ssl_models.histopathology.backbones import EXPORT_SNIPPET, MEAN, STD, timm_description

        size = encoder.image_size
        save_file({k: v.contiguous() for k, v in encoder.backbone.state_dict().items()},
                  str(out_dir / "model.safetensors"))
        config = {**timm_description(encoder.cfg, size), "num_classes": 0, "num_features": encoder.dim,
                  "pretrained_cfg": {"input_size": [3, size, size], "mean": [MEAN] * 3, "std": [STD] * 3,
                                     "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": 0},
                  "ssl_pipeline_preprocessing": asdict(cfg.preprocess)}
        (out_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        return {"library": "timm", "format": "a timm model folder (save_for_hf layout: config.json, model.safetensors)",
                "snippet": EXPORT_SNIPPET, "inputs": f"uint8 RGB tiles [n, {size}, {size}, 3]"}

    def load_export(self, cfg: DomainConfig, folder: Path) -> Encoder:
        """The block's backbone (checked against the description in the export's config.json), the
        export's weights loaded into it strictly."""
        import json

        from safetensors.torch import load_file

        from ssl_models.core.domain import load_exported_weights
        from ssl_models.histopathology.backbones import timm_description

        config = json.loads((folder / "config.json").read_text())
        size = cfg.preprocess.stored_size
        ours = json.loads(json.dumps({**timm_description(cfg.model, size), "input_size": [3, size, size]}))
        theirs = {**{key: config.get(key) for key in ours}, "input_size": config["pretrained_cfg"]["input_size"]}
        if ours != theirs:
            raise PipelineError(f"the export {folder}: its config.json describes another backbone than its "
                                f"ssl_pipeline.json ({theirs} there, {ours} here); export the encoder again")
        encoder = self.build_encoder(replace(cfg, model=replace(cfg.model, base_checkpoint=None)), folder)
        load_exported_weights(encoder.backbone, load_file(str(folder / "model.safetensors")), folder)
        return encoder

    def load_pretrained(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """The architecture the pretrain stage saved (for tiles of the size preprocess stores), then its weights."""
        from ssl_models.histopathology.backbones import load_weights, saved_model

        model, image_size = saved_model(pretrained_dir)
        if image_size != cfg.preprocess.stored_size:
            raise PipelineError(f"the pretrained encoder in {pretrained_dir} was trained on {image_size}-pixel "
                                f"tiles; preprocess now stores {cfg.preprocess.stored_size}: re-run pretrain")
        encoder = self.build_encoder(replace(cfg, model=replace(model, base_checkpoint=None)), shards_dir)
        load_weights(encoder.backbone, pretrained_dir)
        return encoder

    def task_description(self, cfg: DomainConfig, uses_default_data: bool) -> str:
        preprocess = cfg.preprocess
        if uses_default_data:
            from ssl_models.histopathology.default_data import ATTRIBUTION

            options = cfg.default_data
            return (f"IHC DAB grading on one real image, cut into {options.region_size}-pixel regions: a region is "
                    f"`dab-high` when at least {options.high_fraction:.0%} of its stained pixels carry DAB by colour "
                    "deconvolution, else `dab-low`; each tile carries its region's label (weak, region-level "
                    "labels, as slide labels are). The labels come from that rule, not from a pathologist, so the "
                    "task shows whether pretraining helps encode stain and texture, not diagnostic value. Regions "
                    "are the split unit: test tiles come from regions never seen in pretraining or training. "
                    + ATTRIBUTION)
        pooling = ("mean of their tiles' embeddings; `abmil`: gated attention over them"
                   if "abmil" in cfg.finetune.protocols else "mean of their tiles' embeddings")
        unit = (f"slides ({pooling})" if preprocess.labeled_unit == "slide"
                else "tiles, each labeled with its slide's label")
        splits = (f"spatial blocks of {preprocess.spatial_block} pixels (test tiles come from regions "
                  "never trained on)" if preprocess.spatial_block else "slide or labels-CSV group")
        return f"classification of {unit} by the `label` column of {cfg.labels}; split by {splits}"
