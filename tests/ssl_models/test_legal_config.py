"""The legal block of params.yaml: every section checked for names, types and ranges when any
stage starts, the error naming the key."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.legal_text.config import (
    BACKBONES,
    METHODS,
    MLMOptions,
    MLMSpanContrastOptions,
    TextModelConfig,
)
from tests.conftest import cli_error, tiny_params, write_params

W = "domains.legal"
SPAN = {"method": "mlm_span_contrastive"}


@pytest.mark.parametrize("overrides, message", [
    # ingest
    ({"ingest": {"text_fields": "body"}}, f"{W}.ingest: unknown setting(s) ['text_fields']"),
    ({"ingest": {"min_characters": "one"}}, f"{W}.ingest.min_characters: 'one' should be a valid integer"),
    ({"ingest": {"min_characters": 0}}, f"{W}.ingest.min_characters: must be at least 1"),
    ({"ingest": {"fallback_encoding": "klingon-8"}}, f"{W}.ingest.fallback_encoding: unknown encoding"),
    # preprocess
    ({"preprocess": {"vocab": 400}}, f"{W}.preprocess: unknown setting(s) ['vocab']"),
    ({"preprocess": {"lowercase": "yes"}}, f"{W}.preprocess.lowercase: 'yes' should be true or false"),
    ({"preprocess": {"tokenizer": "bpe"}}, f"{W}.preprocess.tokenizer: 'bpe' should be 'train' or 'base'"),
    ({"preprocess": {"block_size": 4}}, f"{W}.preprocess.block_size: must be at least 8"),
    ({"preprocess": {"vocab_size": 5}}, f"{W}.preprocess.vocab_size: must be at least 16"),
    ({"preprocess": {"min_frequency": 0}}, f"{W}.preprocess.min_frequency: must be at least 1"),
    ({"preprocess": {"extend_vocabulary": -1}}, f"{W}.preprocess.extend_vocabulary: must be >= 0"),
    ({"preprocess": {"extend_vocabulary": 100}}, f"{W}.preprocess.extend_vocabulary: extends the base checkpoint's "
                                                 "vocabulary: set tokenizer: base"),
    ({"preprocess": {"extend_min_frequency": 0}}, f"{W}.preprocess.extend_min_frequency: must be at least 1"),
    # model
    ({"model": {"layers": 2}}, f"{W}.model: unknown setting(s) ['layers']"),
    ({"model": {"hidden_size": 32.5}}, f"{W}.model.hidden_size: 32.5 should be a valid integer"),
    ({"model": {"backbone": "gpt2"}}, f"{W}.model.backbone: 'gpt2' should be 'bert'"),
    ({"model": {"base_checkpoint": 3}}, f"{W}.model.base_checkpoint: 3 should be a valid string or null"),
    ({"model": {"num_layers": 0}}, f"{W}.model.num_layers: must be positive"),
    ({"model": {"hidden_size": 33}}, f"{W}.model.hidden_size: must be divisible by num_heads (2)"),
    # default_data
    ({"default_data": {"max_file": 3}}, f"{W}.default_data: unknown setting(s) ['max_file']"),
    ({"default_data": {"max_files": "all"}}, f"{W}.default_data.max_files: 'all' should be a valid integer or null"),
    ({"default_data": {"max_files": 0}}, f"{W}.default_data.max_files: must be positive or null"),
    # pretrain.options of each method
    ({"pretrain": {"options": {"temperature": 0.1}}}, f"{W}.pretrain.options: unknown setting(s) ['temperature']"),
    ({"pretrain": {"options": {"mlm_probability": "high"}}},
     f"{W}.pretrain.options.mlm_probability: 'high' should be a valid number"),
    ({"pretrain": {"options": {"mlm_probability": 1.5}}}, f"{W}.pretrain.options.mlm_probability: must be in (0, 1)"),
    ({"pretrain": {"options": {"distill_weight": -0.5}}}, f"{W}.pretrain.options.distill_weight: must be >= 0"),
    ({"pretrain": {**SPAN, "options": {"distill_weight": "on"}}},
     f"{W}.pretrain.options.distill_weight: 'on' should be a valid number"),
    ({"pretrain": {**SPAN, "options": {"temprature": 0.1}}},
     f"{W}.pretrain.options: unknown setting(s) ['temprature']"),
    ({"pretrain": {**SPAN, "options": {"temperature": [0.1]}}},
     f"{W}.pretrain.options.temperature: [0.1] should be a valid number"),
    ({"pretrain": {**SPAN, "options": {"temperature": 0}}}, f"{W}.pretrain.options.temperature: must be positive"),
    ({"pretrain": {**SPAN, "options": {"contrastive_weight": -1}}},
     f"{W}.pretrain.options.contrastive_weight: must be >= 0"),
    ({"pretrain": {**SPAN, "options": {"mlm_probability": 0}}},
     f"{W}.pretrain.options.mlm_probability: must be in (0, 1)"),
    # across sections
    ({"preprocess": {"tokenizer": "base"}}, f"{W}: preprocess.tokenizer: base goes with model.base_checkpoint"),
])
def test_each_bad_setting_fails_naming_its_key(tmp_path: Path, overrides: dict, message: str) -> None:
    write_params(tmp_path, tiny_params(**overrides))
    with pytest.raises(PipelineError) as caught:
        load_config("legal", tmp_path / "params.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_sections_and_method_options_arrive_typed(tmp_path: Path) -> None:
    write_params(tmp_path, tiny_params(pretrain={**SPAN, "options": {"temperature": 1}}))
    cfg, _ = load_config("legal", tmp_path / "params.yaml")
    assert cfg.pretrain.options == MLMSpanContrastOptions(temperature=1.0)
    assert cfg.model.backbone == "bert" and cfg.model.hidden_size == 32
    write_params(tmp_path, tiny_params())
    assert load_config("legal", tmp_path / "params.yaml")[0].pretrain.options == MLMOptions()


def test_backbone_choices_are_the_registered_backbones() -> None:
    allowed = typing.get_args(typing.get_type_hints(TextModelConfig)["backbone"])
    assert sorted(allowed) == BACKBONES.names()
    assert METHODS.names() == ["mlm", "mlm_span_contrastive"]


def test_a_bad_setting_fails_through_the_cli_in_one_line_within_two_seconds(tmp_path: Path) -> None:
    write_params(tmp_path, tiny_params(pretrain={"options": {"mlm_probability": 2.0}}))
    lines, cpu_seconds = cli_error(tmp_path, "ingest", "legal")
    assert lines == [
        f"error: params.yaml {W}.pretrain.options.mlm_probability: must be in (0, 1)"]
    assert cpu_seconds < 2.0, f"{cpu_seconds:.2f} CPU s"
