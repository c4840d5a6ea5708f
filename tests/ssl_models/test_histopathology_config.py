"""The histo block of params.yaml: every section (method options and their nested augment block
included) checked for names, types and ranges when any stage starts, the error naming the key."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.histopathology.config import (
    BACKBONES,
    METHODS,
    AugmentConfig,
    BYOLOptions,
    HistoModelConfig,
    MAEOptions,
    SimCLROptions,
)
from tests.conftest import cli_error, write_params
from tests.ssl_models.histo_files import histo_params

W = "domains.histo"
O = f"{W}.pretrain.options"


def method(name: str, **options: object) -> dict:
    return {"pretrain": {"method": name, "options": options}}


@pytest.mark.parametrize("overrides, message", [
    # ingest
    ({"ingest": {"min_sid": 8}}, f"{W}.ingest: unknown setting(s) ['min_sid']"),
    ({"ingest": {"min_side": "8"}}, f"{W}.ingest.min_side: '8' should be a valid integer"),
    ({"ingest": {"min_side": 0}}, f"{W}.ingest.min_side: must be at least 1 pixel"),
    # preprocess
    ({"preprocess": {"tile_sise": 32}}, f"{W}.preprocess: unknown setting(s) ['tile_sise']"),
    ({"preprocess": {"stride": "16"}}, f"{W}.preprocess.stride: '16' should be a valid integer or null"),
    ({"preprocess": {"stain_normalisation": "reinhard"}},
     f"{W}.preprocess.stain_normalisation: 'reinhard' should be 'none' or 'macenko'"),
    ({"preprocess": {"scale": 1.5}}, f"{W}.preprocess.scale: must be in (0, 1]"),
    ({"preprocess": {"max_pen_fraction": -0.1}}, f"{W}.preprocess.max_pen_fraction: must be in [0, 1]"),
    ({"preprocess": {"labeled_unit": "slide", "spatial_block": 64}},
     f"{W}.preprocess.spatial_block: labeled_unit: slide keeps whole slides together"),
    # model
    ({"model": {"init_checkpoint": None}}, f"{W}.model: unknown setting(s) ['init_checkpoint']"),
    ({"model": {"torch_threads": 1}}, f"{W}.model: unknown setting(s) ['torch_threads']"),
    ({"model": {"backbone": "resnet50"}}, f"{W}.model.backbone: 'resnet50' should be 'resnet' or 'vit'"),
    ({"model": {"width": 8.5}}, f"{W}.model.width: 8.5 should be a valid integer"),
    ({"model": {"width": 2}}, f"{W}.model.width: must be at least 4"),
    ({"model": {"backbone": "vit", "width": 16, "num_heads": 5}}, f"{W}.model.num_heads: vit: must divide"),
    # default_data
    ({"default_data": {"regions": 64}}, f"{W}.default_data: unknown setting(s) ['regions']"),
    ({"default_data": {"region_size": "big"}}, f"{W}.default_data.region_size: 'big' should be a valid integer"),
    ({"default_data": {"region_size": 8}}, f"{W}.default_data.region_size: must be 16 to 512 pixels"),
    # pretrain.options of each method
    (method("simclr", temprature=0.1), f"{O}: unknown setting(s) ['temprature']"),
    (method("simclr", loss="infonce"), f"{O}.loss: 'infonce' should be 'ntxent' or 'dcl'"),
    (method("simclr", temperature=0), f"{O}.temperature: must be positive"),
    (method("vicreg", loss="dcl"), f"{O}: unknown setting(s) ['loss']"),
    (method("vicreg", projection_dim=0), f"{O}.projection_dim: must be positive"),
    (method("byol", momentum="0.99"), f"{O}.momentum: '0.99' should be a valid number"),
    (method("byol", momentum=1.0), f"{O}.momentum: must be in [0, 1)"),
    ({**method("mae", mask_ratio=1.0), "model": {"backbone": "vit"}}, f"{O}.mask_ratio: must be in (0, 1)"),
    ({**method("mae", decoder_dim=30), "model": {"backbone": "vit"}}, f"{O}.decoder_dim: must be a positive multiple"),
    # the nested augment block
    (method("simclr", augment={"hed_jiter": 0.1}), f"{O}.augment: unknown setting(s) ['hed_jiter']"),
    (method("byol", augment={"rotate90": "yes"}), f"{O}.augment.rotate90: 'yes' should be true or false"),
    (method("simclr", augment={"crop_scale": 1.5}), f"{O}.augment.crop_scale: must be in (0, 1]"),
    (method("vicreg", augment={"blur_probability": 2}), f"{O}.augment.blur_probability: must be in [0, 1]"),
    (method("simclr", augment=[0.6]), f"{O}.augment: [0.6] should be a mapping of settings"),
    # across sections
    (method("mae"), f"{W}.pretrain.method: mae needs model.backbone: vit"),
    ({"model": {"backbone": "vit", "patch_size": 5}}, f"{W}.model.patch_size: 5 must divide the stored tile size 32"),
    ({"pretrain": {"method": "swav"}},
     f"{W}.pretrain.method: unknown histopathology SSL method 'swav'; valid names: barlow_twins, byol, dino, mae, "
     "simclr, vicreg"),
])
def test_each_bad_setting_fails_naming_its_key(tmp_path: Path, overrides: dict, message: str) -> None:
    write_params(tmp_path, histo_params(**overrides))
    with pytest.raises(PipelineError) as caught:
        load_config("histo", tmp_path / "params.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_sections_and_method_options_arrive_typed(tmp_path: Path) -> None:
    write_params(tmp_path, histo_params(**method("byol", momentum=0, augment={"crop_scale": 1})))
    cfg, domain = load_config("histo", tmp_path / "params.yaml")
    assert cfg.pretrain.options == BYOLOptions(momentum=0.0, augment=AugmentConfig(crop_scale=1.0))
    assert isinstance(cfg.pretrain.options.momentum, float)
    assert cfg.model == HistoModelConfig(backbone="resnet", width=8, depth=1) and cfg.preprocess.stored_size == 32
    assert cfg.cpu_threads == 1 and domain.available_inits(cfg) == ["ssl", "scratch", "baseline"]
    write_params(tmp_path, histo_params(**method("mae"), model={"backbone": "vit", "base_checkpoint": "weights"}))
    cfg, domain = load_config("histo", tmp_path / "params.yaml")
    assert cfg.pretrain.options == MAEOptions() and domain.available_inits(cfg) == ["ssl", "scratch", "generic", "baseline"]
    write_params(tmp_path, histo_params())
    assert load_config("histo", tmp_path / "params.yaml")[0].pretrain.options == SimCLROptions(loss="dcl")


def test_backbone_choices_are_the_registered_backbones() -> None:
    allowed = typing.get_args(typing.get_type_hints(HistoModelConfig)["backbone"])
    assert sorted(allowed) == BACKBONES.names() == ["resnet", "vit"]
    assert METHODS.names() == ["barlow_twins", "byol", "dino", "mae", "simclr", "vicreg"]


def test_a_bad_setting_fails_through_the_cli_in_one_line_within_two_seconds(tmp_path: Path) -> None:
    write_params(tmp_path, histo_params(**method("simclr", augment={"crop_scale": 1.5})))
    lines, cpu_seconds = cli_error(tmp_path, "ingest", "histo")
    assert lines == [f"error: params.yaml {O}.augment.crop_scale: must be in (0, 1]"]
    assert cpu_seconds < 2.0, f"{cpu_seconds:.2f} CPU s"


def test_a_method_in_a_file_of_its_own_names_its_options_lazily_and_they_parse(tmp_path: Path) -> None:
    """Barlow Twins is one file and one registration line: its options load only when it is chosen."""
    write_params(tmp_path, histo_params(**method("barlow_twins", projection_dim=32, lambda_param=0.01)))
    cfg, _ = load_config("histo", tmp_path / "params.yaml")
    assert type(cfg.pretrain.options).__name__ == "BarlowTwinsOptions"
    assert (cfg.pretrain.options.projection_dim, cfg.pretrain.options.lambda_param) == (32, 0.01)
    write_params(tmp_path, histo_params(**method("barlow_twins", lambda_param=-1)))
    with pytest.raises(PipelineError, match="lambda_param: must be zero or positive"):
        load_config("histo", tmp_path / "params.yaml")


def test_dino_options_nest_the_crops_and_check_them_before_any_work(tmp_path: Path) -> None:
    write_params(tmp_path, histo_params(**method("dino", ibot_weight=0.5, crops={"local_crops": 6})))
    options = load_config("histo", tmp_path / "params.yaml")[0].pretrain.options
    assert type(options).__name__ == "DINOOptions" and (options.ibot_weight, options.crops.local_crops) == (0.5, 6)
    for bad, message in [({"crops": {"local_scale": [0.5, 0.1]}}, r"crops.local_scale: must be \[low, high\]"),
                         ({"warmup_teacher_temp": 0.1, "teacher_temp": 0.05}, "must not exceed teacher_temp"),
                         ({"augment": {"batch_styles_standardization": True}}, "no batch-level style swap")]:
        write_params(tmp_path, histo_params(**method("dino", **bad)))
        with pytest.raises(PipelineError, match=message):
            load_config("histo", tmp_path / "params.yaml")
