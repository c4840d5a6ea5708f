"""3D medical volumes (CT / MR): NIfTI, NRRD and DICOM readers with de-identification,
MONAI preprocessing, and ViT / 3D-ResNet self-supervised pretraining."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain, Locate, Record, Rejected, Source
from ssl_models.core.errors import PipelineError
from ssl_models.medical3d.config import BACKBONES, METHODS, SECTIONS, VIT_METHODS
from ssl_models.medical3d.default_data import ATTRIBUTION

if TYPE_CHECKING:
    from ssl_models.core.modules import Encoder

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".dicom", ".ima")


class Medical3D(Domain, module="medical3d"):
    default_method = "mae"
    name, suffixes = "medical3d", VOLUME_SUFFIXES
    pseudonymise_by_default = True  # file names of medical data often carry patient names
    streams_sources = False  # a DICOM series is grouped from every file of the corpus
    sections, methods, backbones = SECTIONS, METHODS, BACKBONES
    baseline = "ssl_models.medical3d.baseline"

    def validate(self, cfg: DomainConfig) -> None:
        method, model, where = cfg.pretrain.method, cfg.model, f"params.yaml domains.{cfg.name}"
        if method in VIT_METHODS and model.backbone != "vit":
            raise PipelineError(f"{where}: method {method!r} trains a ViT; set model.backbone: vit "
                                f"(or use method simclr with backbone {model.backbone!r})")
        if method == "swin_ssl" and model.backbone != "swin":
            raise PipelineError(f"{where}: method 'swin_ssl' trains SwinUNETR's Swin encoder; set model.backbone: swin")
        if method == "mae":
            n_patches = (model.size // model.patch_size) ** 3
            if int((1 - cfg.pretrain.options.masking_ratio) * n_patches) < 1:
                raise PipelineError(f"{where}.pretrain.options.masking_ratio: keeps no patch of the "
                                    f"{n_patches} in a cube; lower it or use a smaller model.patch_size")

    def accepts(self, path: Path) -> bool:
        from ssl_models.medical3d.dicom import looks_like_dicom

        name = path.name.lower()
        return name.endswith(VOLUME_SUFFIXES) or looks_like_dicom(path)

    def sources(self, files: list[Path], corpus: Path, cfg: DomainConfig) -> Iterator[Source | Rejected]:
        from ssl_models.core.workers import file_stamp, run_items
        from ssl_models.medical3d.dicom import group_series, looks_like_dicom, series_headers

        dicom = [p for p in files if looks_like_dicom(p)]
        # every header read on the stage's engine (a PACS export: hundreds of thousands of files)
        headers = run_items(series_headers, None, dicom, lambda path: (str(path), file_stamp(path)),
                            part="dicom-headers")
        yield from group_series(dicom, corpus, headers)
        for path in files:
            if not looks_like_dicom(path):
                yield Source(path.relative_to(corpus).as_posix(), [path])

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        from ssl_models.medical3d.readers import read_volume_record

        yield read_volume_record(source, cfg.ingest)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        from ssl_models.medical3d.default_data import (
            copy_registry_volumes,
            write_mni_crops,
        )

        options = cfg.default_data
        crops = write_mni_crops(out_dir, options)
        extras = copy_registry_volumes(out_dir) if options.extra_volumes else 0
        return {"labeled_mni152_cubes": crops, "registry_volumes": extras}

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Locate) -> dict[str, Any]:
        from ssl_models.medical3d.shards import write_volume_shards

        return write_volume_shards(cfg, manifest, out_dir, locate)

    def export(self, cfg: DomainConfig, encoder: Encoder, out_dir: Path) -> dict[str, Any]:
        """A MONAI bundle: `configs/inference.json` (the network), `configs/metadata.json` (with
        `network_data_format`, and the preprocessing: spacing, orientation, CT window, MR scaling),
        `models/model.pt` and `models/model.safetensors` (the bare backbone; a Swin one also as
        `models/model_swinvit.pt`, MONAI's published layout), `docs/README.md`."""
        import json

        import monai
        import torch
        from safetensors.torch import save_file

        from ssl_models.medical3d.backbones import EXPORT_SNIPPET, network_def

        m, pre = encoder.cfg, cfg.preprocess
        state = {k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}
        (out_dir / "models").mkdir()
        (out_dir / "configs").mkdir()
        (out_dir / "docs").mkdir()
        torch.save(state, out_dir / "models" / "model.pt")
        save_file(state, str(out_dir / "models" / "model.safetensors"))
        if m.backbone == "swin":  # also as MONAI publishes SwinUNETR's SSL weights: `SwinUNETR.load_from` takes it
            from ssl_models.medical3d.swin import published_layout

            torch.save(published_layout(state), out_dir / "models" / "model_swinvit.pt")
        (out_dir / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def(m)}, indent=1))
        preprocessing = {
            "orientation": "RAS", "spacing_mm": pre.spacing or "each volume's own (not resampled)", "cube_voxels": m.size,
            "ct": f"HU clipped to {pre.ct_window} and scaled to [0, 1]",
            "mr": (f"{pre.mr_percentiles[0]:g}th-{pre.mr_percentiles[1]:g}th percentile to [0, 1]"
                   if pre.mr_normalisation == "percentile" else "z-score of the nonzero voxels"),
            "crop_foreground": pre.crop_foreground, "foreground_threshold": pre.foreground_threshold}
        metadata = {
            "version": "0.1.0", "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "name": f"ssl-pipeline {cfg.name} encoder", "task": "self-supervised feature extraction",
            "description": f"The {m.backbone} backbone pretrained by ssl-pipeline ({cfg.pretrain.method}); "
                           "one feature vector per volume.",
            "authors": "ssl-pipeline run", "copyright": "the organisation that ran it",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "hounsfield or magnitude, scaled to [0, 1]",
                                     "modality": "CT or MR", "num_channels": 1,
                                     "spatial_shape": [m.size] * 3, "dtype": "float32", "value_range": [0, 1],
                                     "is_patch_data": False, "channel_def": {"0": "image"}}},
                "outputs": {"pred": {"type": "vector", "format": "features", "num_channels": encoder.dim,
                                     "spatial_shape": [], "dtype": "float32",
                                     "value_range": [], "is_patch_data": False}}},
            "preprocessing": preprocessing}
        (out_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
        return {"library": "monai", "format": "a MONAI bundle (configs/inference.json, configs/metadata.json, "
                                              "models/model.pt)",
                "snippet": EXPORT_SNIPPET, "inputs": f"float32 cubes [n, 1, {m.size}, {m.size}, {m.size}]",
                "docs": "docs/README.md"}

    def load_export(self, cfg: DomainConfig, folder: Path) -> Encoder:
        """The block's network (checked against the bundle's configs/inference.json), the bundle's
        weights loaded into it strictly."""
        import json
        from dataclasses import replace

        from safetensors.torch import load_file

        from ssl_models.core.domain import load_exported_weights
        from ssl_models.medical3d.backbones import network_def

        ours = json.loads(json.dumps(network_def(cfg.model)))
        theirs = json.loads((folder / "configs" / "inference.json").read_text())["network_def"]
        if ours != theirs:
            raise PipelineError(f"the export {folder}: its configs/inference.json describes another network than "
                                f"its ssl_pipeline.json ({theirs} there, {ours} here); export the encoder again")
        encoder = self.build_encoder(replace(cfg, model=replace(cfg.model, base_checkpoint=None)), folder)
        load_exported_weights(encoder.backbone, load_file(str(folder / "models" / "model.safetensors")), folder)
        return encoder

    def load_pretrained(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """The architecture and weights `VolumeEncoder.save` wrote."""
        from dataclasses import replace

        from ssl_models.medical3d.backbones import load_saved_weights, saved_model

        # the saved model section names the checkpoint it continued from: its weights are the saved ones now
        model = replace(saved_model(pretrained_dir), base_checkpoint=None)
        encoder = self.build_encoder(replace(cfg, model=model), shards_dir)
        load_saved_weights(encoder.backbone, pretrained_dir)
        return encoder

    # the report's sentence on what the labeled task is
    task_kind = "volume classification"
    default_task = ("grey- vs white-matter-dominated 24 mm cubes of the MNI152 T1 brain template (labels from the "
                    "template's own tissue probability maps; cubes of one 48 mm block share a split, so test regions "
                    "are never trained on). A small, real but easy anatomical task: it shows the pipeline end to "
                    "end, not clinical value. " + ATTRIBUTION)
