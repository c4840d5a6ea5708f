"""The medical block of params.yaml: every section checked for names, types and ranges when any
stage starts, the error naming the key."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.medical3d.config import (
    BACKBONES,
    METHODS,
    InpaintingContrastiveOptions,
    MaeOptions,
    SimCLROptions,
    VolumeModelConfig,
)
from ssl_models.medical3d.swin import SwinSSLOptions
from tests.conftest import cli_error, write_params
from tests.ssl_models.medical_files import medical_params

W = "domains.medical"
INPAINT = {"method": "vit_inpainting_contrastive"}
SIMCLR = {"method": "simclr"}
SWIN_SSL = {"method": "swin_ssl"}


@pytest.mark.parametrize("overrides, message", [
    # ingest
    ({"ingest": {"min_slice": 8}}, f"{W}.ingest: unknown setting(s) ['min_slice']"),
    ({"ingest": {"min_slices": "eight"}}, f"{W}.ingest.min_slices: 'eight' should be a valid integer"),
    ({"ingest": {"min_slices": 0}}, f"{W}.ingest.min_slices: must be at least 1"),
    ({"ingest": {"nifti_modality": "pet"}}, f"{W}.ingest.nifti_modality: 'pet' should be 'auto', 'ct' or 'mr'"),
    ({"ingest": {"slice_gap_tolerance": 0}}, f"{W}.ingest.slice_gap_tolerance: must be positive"),
    # preprocess
    ({"preprocess": {"spacings": [1, 1, 1]}}, f"{W}.preprocess: unknown setting(s) ['spacings']"),
    ({"preprocess": {"crop_foreground": "yes"}}, f"{W}.preprocess.crop_foreground: 'yes' should be true or false"),
    ({"preprocess": {"ct_window": ["air", 1000]}}, f"{W}.preprocess.ct_window[0]: 'air' should be a valid number"),
    ({"preprocess": {"mr_normalisation": "minmax"}},
     f"{W}.preprocess.mr_normalisation: 'minmax' should be 'percentile' or 'zscore'"),
    ({"preprocess": {"spacing": [1, 1]}}, f"{W}.preprocess.spacing: must be null or three positive"),
    ({"preprocess": {"ct_window": [1000, -1000]}}, f"{W}.preprocess.ct_window: must be [low, high] in HU"),
    ({"preprocess": {"mr_percentiles": [1, 101]}}, f"{W}.preprocess.mr_percentiles: must be [low, high] within"),
    # model
    ({"model": {"depth": 2}}, f"{W}.model: unknown setting(s) ['depth']"),
    ({"model": {"size": 16.5}}, f"{W}.model.size: 16.5 should be a valid integer"),
    ({"model": {"backbone": "unetr"}}, f"{W}.model.backbone: 'unetr' should be 'vit', 'resnet' or 'swin'"),
    ({"model": {"backbone": "swin", "size": 48}},
     f"{W}.model.size: must be a multiple of 32 for the swin backbone (SwinUNETR halves the grid five times)"),
    ({"model": {"swin_feature_size": 16}},
     f"{W}.model.swin_feature_size: must be a positive multiple of 12 (as MONAI's SwinUNETR requires)"),
    ({"model": {"swin_depths": [2, 2, 2]}}, f"{W}.model.swin_depths: lists four positive numbers of blocks"),
    ({"model": {"swin_num_heads": [3, 6, 12, 20]}},
     f"{W}.model.swin_num_heads: lists four head counts, each dividing its stage's width"),
    ({"model": {"swin_window_size": 0}}, f"{W}.model.swin_window_size: must be positive"),
    ({"model": {"base_checkpoint": 3}}, f"{W}.model.base_checkpoint: 3 should be a valid string or null"),
    ({"model": {"num_heads": 0}}, f"{W}.model.num_heads: must be positive"),
    ({"model": {"size": 20}}, f"{W}.model.size: must be a multiple of patch_size"),
    ({"model": {"hidden_size": 25}}, f"{W}.model.hidden_size: must be a multiple of num_heads"),
    ({"model": {"resnet_widths": [4, 8]}}, f"{W}.model.resnet_widths: lists four positive stage widths"),
    # default_data
    ({"default_data": {"crop": 24}}, f"{W}.default_data: unknown setting(s) ['crop']"),
    ({"default_data": {"extra_volumes": "no"}}, f"{W}.default_data.extra_volumes: 'no' should be true or false"),
    ({"default_data": {"crop_size": 4}}, f"{W}.default_data.crop_size: must be at least 8 voxels"),
    ({"default_data": {"block_size": 16}}, f"{W}.default_data.block_size: must be at least crop_size"),
    ({"default_data": {"min_brain_fraction": 1.5}}, f"{W}.default_data.min_brain_fraction: must be in [0, 1]"),
    # pretrain.options of each method
    ({"pretrain": {"options": {"mask_ratio": 0.5}}}, f"{W}.pretrain.options: unknown setting(s) ['mask_ratio']"),
    ({"pretrain": {"options": {"masking_ratio": "high"}}},
     f"{W}.pretrain.options.masking_ratio: 'high' should be a valid number"),
    ({"pretrain": {"options": {"masking_ratio": 1.0}}}, f"{W}.pretrain.options.masking_ratio: must be in (0, 1)"),
    ({"pretrain": {"options": {"decoder_hidden_size": 40}}},
     f"{W}.pretrain.options.decoder_hidden_size: must be a positive multiple of 12"),
    ({"pretrain": {"options": {"decoder_layers": 0}}}, f"{W}.pretrain.options.decoder_layers: must be at least 1"),
    ({"pretrain": {"options": {"norm_pixel_loss": 1}}},
     f"{W}.pretrain.options.norm_pixel_loss: 1 should be true or false"),
    ({"pretrain": {**INPAINT, "options": {"masking_ratio": 0.5}}},
     f"{W}.pretrain.options: unknown setting(s) ['masking_ratio']"),
    ({"pretrain": {**INPAINT, "options": {"contrastive_weight": [1]}}},
     f"{W}.pretrain.options.contrastive_weight: [1] should be a valid number"),
    ({"pretrain": {**INPAINT, "options": {"contrastive_weight": -1}}},
     f"{W}.pretrain.options.contrastive_weight: must be zero or positive"),
    ({"pretrain": {**INPAINT, "options": {"temperature": 0}}}, f"{W}.pretrain.options.temperature: must be positive"),
    ({"pretrain": {**SIMCLR, "options": {"projection": 8}}},
     f"{W}.pretrain.options: unknown setting(s) ['projection']"),
    ({"pretrain": {**SIMCLR, "options": {"projection_dim": 8.5}}},
     f"{W}.pretrain.options.projection_dim: 8.5 should be a valid integer"),
    ({"pretrain": {**SIMCLR, "options": {"projection_dim": 0}}},
     f"{W}.pretrain.options.projection_dim: must be at least 1"),
    ({"pretrain": {**SIMCLR, "options": {"temperature": -0.1}}}, f"{W}.pretrain.options.temperature: must be positive"),
    ({"pretrain": {**SWIN_SSL, "options": {"rotation_weight": -1}}},
     f"{W}.pretrain.options.rotation_weight: must be zero or positive"),
    ({"pretrain": {**SWIN_SSL, "options": {"reconstruction_weight": 0, "rotation_weight": 0,
                                           "contrastive_weight": 0}}},
     f"{W}.pretrain.options: at least one of reconstruction_weight, rotation_weight and contrastive_weight"),
    ({"pretrain": {**SWIN_SSL, "options": {"max_dropped": 1}}}, f"{W}.pretrain.options.max_dropped: must be in (0, 1)"),
    # across sections
    ({"model": {"backbone": "resnet"}}, f"{W}: method 'mae' trains a ViT; set model.backbone: vit"),
    ({"pretrain": {"options": {"masking_ratio": 0.9}}},  # 8 patches in a 16-voxel cube: int(0.1 * 8) = 0 kept
     f"{W}.pretrain.options.masking_ratio: keeps no patch of the 8 in a cube"),
])
def test_each_bad_setting_fails_naming_its_key(tmp_path: Path, overrides: dict, message: str) -> None:
    write_params(tmp_path, medical_params(**overrides))
    with pytest.raises(PipelineError) as caught:
        load_config("medical", tmp_path / "params.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("pretrain, options", [
    ({"method": "mae", "options": {"masking_ratio": 0.5}}, MaeOptions(masking_ratio=0.5)),
    ({**INPAINT, "options": {"contrastive_weight": 1}}, InpaintingContrastiveOptions(contrastive_weight=1.0)),
    ({**SIMCLR}, SimCLROptions()),
    ({**SWIN_SSL, "options": {"contrastive_weight": 0.5}}, SwinSSLOptions(contrastive_weight=0.5)),
])
def test_sections_and_method_options_arrive_typed(tmp_path: Path, pretrain: dict, options: object) -> None:
    swin = pretrain.get("method") == "swin_ssl"  # trains SwinUNETR's encoder, on cubes of a multiple of 32
    write_params(tmp_path, medical_params(pretrain=pretrain, **({"model": {"backbone": "swin", "size": 32}} if swin else {})))
    cfg, _ = load_config("medical", tmp_path / "params.yaml")
    assert cfg.pretrain.options == options
    assert cfg.model.size == (32 if swin else 16) and cfg.preprocess.spacing is None and cfg.ingest.nifti_modality == "auto"
    assert cfg.default_data.crop_size == 24


def test_backbone_choices_are_the_registered_backbones() -> None:
    allowed = typing.get_args(typing.get_type_hints(VolumeModelConfig)["backbone"])
    assert sorted(allowed) == BACKBONES.names()
    assert METHODS.names() == ["barlow_twins", "dino", "mae", "simclr", "swin_ssl", "vit_inpainting_contrastive"]


def test_the_repository_params_parse() -> None:
    cfg, domain = load_config("medical", Path(__file__).resolve().parents[2] / "params.yaml")
    assert cfg.pretrain.options == MaeOptions(masking_ratio=0.75) and domain.pseudonymises(cfg)


def test_a_bad_setting_fails_through_the_cli_in_one_line_within_two_seconds(tmp_path: Path) -> None:
    write_params(tmp_path, medical_params(pretrain={"options": {"masking_ratio": 2.0}}))
    lines, cpu_seconds = cli_error(tmp_path, "ingest", "medical")
    assert lines == [
        f"error: params.yaml {W}.pretrain.options.masking_ratio: must be in (0, 1)"]
    assert cpu_seconds < 2.0, f"{cpu_seconds:.2f} CPU s"
