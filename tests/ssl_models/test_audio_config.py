"""domains.audio is checked whole before any stage works: each bad setting fails naming its key."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest

from ssl_models.audio.config import BACKBONES, METHODS, AudioModelConfig
from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from tests.conftest import cli_error, write_params

BLOCK = {
    "module": "audio", "corpus": "corpus", "labels": "labels.csv", "cpu_threads": 1,
    "default_data": {"speakers": 8, "takes": 1},
    "ingest": {"sample_rate": 8000, "segment_seconds": 4.0, "group_by": "folder"},
    "preprocess": {"input": "log_mel", "n_mels": 16, "n_fft": 200, "hop_length": 80, "clip_seconds": 0.8},
    "model": {"backbone": "spectrogram_transformer", "hidden_size": 16, "num_heads": 2},
    "pretrain": {"method": "tera", "options": {"time_fraction": 0.2}},
}
WAV2VEC2 = {"preprocess": {"input": "waveform"}, "model": {"backbone": "wav2vec2"},
            "pretrain": {"method": "wav2vec2", "options": {}}}
MASKED = {"pretrain": {"method": "masked_spectrogram", "options": {}}}


def block(*changes: dict) -> dict:
    """BLOCK with each change merged in ({"model": {"dropout": 2}}, {"pretrain": {"options": {...}}})."""
    merged = copy.deepcopy(BLOCK)
    for change in changes:
        for section, values in change.items():
            if section == "pretrain":
                merged["pretrain"] = {**merged["pretrain"], **values}
            else:
                merged[section] = {**merged.get(section, {}), **values}
    return merged


def load(root: Path, settings: dict) -> None:
    write_params(root, {"domains": {"audio": settings}})
    load_config("audio", root / "params.yaml")


UNKNOWN, TYPE, RANGE = "unknown key", "wrong type", "out of range"
CASES = [  # (section, base block change, kind, key, value)
    ("ingest", None, UNKNOWN, "sampel_rate", 16000), ("ingest", None, TYPE, "sample_rate", "16k"),
    ("ingest", None, TYPE, "group_by", "speaker"), ("ingest", None, TYPE, "trim_silence", "yes"),
    ("ingest", None, RANGE, "sample_rate", 1000), ("ingest", None, RANGE, "min_seconds", 5.0),
    ("preprocess", None, UNKNOWN, "n_mel", 64), ("preprocess", None, TYPE, "n_mels", 64.5),
    ("preprocess", None, TYPE, "input", "mfcc"), ("preprocess", None, RANGE, "n_mels", 4),
    ("preprocess", None, RANGE, "hop_length", 400), ("preprocess", None, RANGE, "clip_seconds", 0),
    ("model", None, UNKNOWN, "cpu_threads", 1), ("model", None, TYPE, "num_layers", "two"),
    ("model", None, TYPE, "backbone", "resnet"), ("model", None, TYPE, "base_checkpoint", 3),
    ("model", None, RANGE, "pool_segments", 0), ("model", None, RANGE, "dropout", 1.5),
    ("model", None, RANGE, "hidden_size", 31),
    ("default_data", None, UNKNOWN, "voices", 4), ("default_data", None, TYPE, "sentences", "no"),
    ("default_data", None, RANGE, "speakers", 60),
    ("pretrain.options", None, UNKNOWN, "mask_fraction", 0.4), ("pretrain.options", None, TYPE, "time_block", 2.5),
    ("pretrain.options", None, RANGE, "noise_probability", 1.5),
    ("pretrain.options", MASKED, UNKNOWN, "time_fraction", 0.2),
    ("pretrain.options", MASKED, TYPE, "generative_weight", "high"),
    ("pretrain.options", MASKED, RANGE, "mask_fraction", 1.0),
    ("pretrain.options", WAV2VEC2, UNKNOWN, "mask_prob", 0.5),
    ("pretrain.options", WAV2VEC2, TYPE, "mask_length", "4"),
    ("pretrain.options", WAV2VEC2, RANGE, "gumbel_temperature", 0.0),
]


@pytest.mark.parametrize("section,base,kind,key,value", CASES,
                         ids=[f"{s}-{(b or {}).get('pretrain', {}).get('method', '')}-{k}-{key}"
                              for s, b, k, key, _ in CASES])
def test_each_bad_setting_fails_naming_its_key(tmp_path: Path, section: str, base: dict | None, kind: str,
                                               key: str, value: object) -> None:
    change: dict = {key: value}
    if section == "pretrain.options":
        change = {"pretrain": {"options": change}}
    else:
        change = {section: change}
    with pytest.raises(PipelineError) as failure:
        load(tmp_path, block(*([base] if base else []), change))
    message, place = str(failure.value), f"domains.audio.{section}"
    if kind == UNKNOWN:
        assert f"{place}: unknown setting(s) ['{key}']" in message
    else:
        assert f"{place}.{key}" in message
    assert "\n" not in message


@pytest.mark.parametrize("changes,fragment", [
    ([{"pretrain": {"method": "wav2vec2", "options": {}}}],
     ("pretrain.method wav2vec2 reads waveform input, but preprocess.input is log_mel and model.backbone "
      "spectrogram_transformer reads log_mel; set preprocess.input: waveform and model.backbone: wav2vec2")),
    ([WAV2VEC2, {"model": {"backbone": "spectrogram_transformer"}}], "set model.backbone: wav2vec2"),
    ([{"preprocess": {"input": "waveform"}}], "set preprocess.input: log_mel"),
    ([{"model": {"patch_mels": 5}}], "domains.audio.model.patch_mels 5 must divide preprocess.n_mels 16"),
    ([{"pretrain": {"options": {"max_freq_band": 20}}}],
     "domains.audio.pretrain.options.max_freq_band 20 exceeds preprocess.n_mels 16"),
    ([WAV2VEC2, {"preprocess": {"clip_seconds": 0.1}}, {"pretrain": {"options": {"mask_length": 5}}}],
     "domains.audio.pretrain.options.mask_length 5 exceeds the 2 frames of a clip"),
])
def test_settings_that_do_not_fit_together_fail_in_one_line(tmp_path: Path, changes: list[dict],
                                                            fragment: str) -> None:
    with pytest.raises(PipelineError, match="^params.yaml domains.audio") as failure:
        load(tmp_path, block(*changes))
    assert fragment in str(failure.value)


def test_the_example_blocks_load_typed(tmp_path: Path) -> None:
    from ssl_models.audio.config import TERAOptions, Wav2Vec2Options

    write_params(tmp_path, {"domains": {"audio": block()}})
    cfg, _ = load_config("audio", tmp_path / "params.yaml")
    assert cfg.pretrain.options == TERAOptions(time_fraction=0.2) and cfg.cpu_threads == 1
    write_params(tmp_path, {"domains": {"audio": block(WAV2VEC2)}})
    cfg, _ = load_config("audio", tmp_path / "params.yaml")
    assert isinstance(cfg.pretrain.options, Wav2Vec2Options) and cfg.model.backbone == "wav2vec2"


def test_model_backbone_choices_are_the_registered_backbones() -> None:
    assert sorted(typing.get_args(typing.get_type_hints(AudioModelConfig)["backbone"])) == BACKBONES.names()
    assert METHODS.names() == ["hubert", "masked_spectrogram", "tera", "wav2vec2"]


def test_the_cli_prints_one_line_and_exits_2_within_two_seconds(tmp_path: Path) -> None:
    write_params(tmp_path, {"domains": {"audio": block({"model": {"cpu_threads": 1}})}})  # moved to cpu_threads
    lines, cpu_seconds = cli_error(tmp_path, "ingest", "audio")
    assert len(lines) == 1 and "domains.audio.model: unknown setting(s) ['cpu_threads']" in lines[0]
    assert cpu_seconds < 2.0, f"{cpu_seconds:.2f} CPU s"
