"""Audio: wav/flac/ogg/mp3 readers, log-mel or waveform shards, TERA, SSAST-style masked
spectrogram modelling and wav2vec2 pretraining, clip classification downstream."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ssl_models.audio.config import (
    AUDIO_METHODS,
    METHOD_INPUTS,
    AudioIngestConfig,
    AudioModelConfig,
    AudioPreprocessConfig,
    SpokenDigitsDefaultConfig,
)
from ssl_models.audio.readers import AUDIO_SUFFIXES, read_audio_file
from ssl_models.core.config import DomainConfig, parse_section
from ssl_models.core.domain import DOMAINS, Domain, Record, Rejected
from ssl_models.core.errors import PipelineError

if TYPE_CHECKING:
    from datasets import Dataset

    from ssl_models.audio.features import InputSpec
    from ssl_models.core.domain import Source
    from ssl_models.core.modules import Encoder, PretrainMethod

# librosa, torch and transformers are imported by the methods that need them, so that
# default_data and ingest start fast.
log = logging.getLogger(__name__)
INPUT_FILE = "audio_input.json"  # beside a saved encoder: how to turn audio into its input


@DOMAINS.register("audio")
class Audio(Domain):
    name = "audio"
    suffixes = AUDIO_SUFFIXES

    def _section(self, cls: type, cfg: DomainConfig, section: str) -> Any:
        return parse_section(cls, getattr(cfg, section), f"domains.{cfg.name}.{section}")

    def _spec(self, cfg: DomainConfig) -> InputSpec:
        from ssl_models.audio.features import InputSpec

        return InputSpec.from_config(self._section(AudioIngestConfig, cfg, "ingest"),
                                     self._section(AudioPreprocessConfig, cfg, "preprocess"))

    def validate(self, cfg: DomainConfig) -> None:
        where = f"domains.{cfg.name}"
        self._section(AudioIngestConfig, cfg, "ingest")
        preprocess = self._section(AudioPreprocessConfig, cfg, "preprocess")
        model = self._section(AudioModelConfig, cfg, "model")
        self._section(SpokenDigitsDefaultConfig, cfg, "default_data")
        AUDIO_METHODS.check(cfg.pretrain.method)
        needed = METHOD_INPUTS[cfg.pretrain.method]
        if preprocess.input != needed:
            raise PipelineError(f"params.yaml {where}: pretrain.method {cfg.pretrain.method} reads {needed} "
                                f"input; set preprocess.input: {needed}")
        if needed == "log_mel" and model.patch_mels and preprocess.n_mels % model.patch_mels:
            raise PipelineError(f"params.yaml {where}.model.patch_mels {model.patch_mels} must divide "
                                f"preprocess.n_mels {preprocess.n_mels}")

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        yield from read_audio_file(source.paths[0], source.key, self._section(AudioIngestConfig, cfg, "ingest"))

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> None:
        from ssl_models.audio.default_data import write_spoken_digits

        options = self._section(SpokenDigitsDefaultConfig, cfg, "default_data")
        counts = write_spoken_digits(out_dir, options.speakers, options.takes, options.sentences)
        log.info("default audio corpus (generated speech): %s", counts)

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Callable[[dict[str, Any]], Source]) -> dict[str, Any]:
        from ssl_models.audio.shards import write_shards

        spec = self._spec(cfg)
        records = self._records(cfg, manifest, locate)
        summary = write_shards(records, {row["key"]: row for row in manifest}, spec, out_dir)
        (out_dir / INPUT_FILE).write_text(json.dumps(spec.__dict__, indent=1))
        return summary

    def _records(self, cfg: DomainConfig, manifest: list[dict[str, Any]],
                 locate: Callable[[dict[str, Any]], Source]) -> Iterator[Record]:
        """The manifest's records, re-read file by file in manifest order (one file in memory at a time)."""
        wanted = {row["key"] for row in manifest}
        sources: dict[str, Source] = {}
        for row in manifest:
            source = locate(row)
            sources.setdefault(source.key, source)
        for source in sources.values():
            for record in self.read(source, cfg):
                if isinstance(record, Record) and record.key in wanted:
                    yield record

    def pretrain_dataset(self, shards_dir: Path, split: str) -> Dataset | list:
        from datasets import load_from_disk

        folder = shards_dir / f"pretrain_{split}"
        if not any(folder.glob("*.arrow")):  # datasets writes no shard file for zero rows
            return []
        return load_from_disk(str(folder))

    def _model_cfg(self, cfg: DomainConfig) -> AudioModelConfig:
        model_cfg = self._section(AudioModelConfig, cfg, "model")
        if model_cfg.cpu_threads:
            import torch

            torch.set_num_threads(model_cfg.cpu_threads)
        return model_cfg

    def build_pretrain_method(self, cfg: DomainConfig, shards_dir: Path) -> PretrainMethod:
        spec = self._spec(cfg)
        model_cfg = self._model_cfg(cfg)
        method_cls = AUDIO_METHODS.get(cfg.pretrain.method)
        if spec.kind == "waveform":
            from ssl_models.audio.wav2vec2 import build_wav2vec2

            model = build_wav2vec2(model_cfg)
        else:
            from ssl_models.audio.backbones import build_spectrogram_backbone

            model = build_spectrogram_backbone(model_cfg, spec, shards_dir)
        try:
            return method_cls(model, spec, **cfg.pretrain.options)
        except TypeError as error:
            raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.options do not fit method "
                                f"{cfg.pretrain.method!r}: {error}") from None

    def save_pretrained(self, method: PretrainMethod, out_dir: Path) -> None:
        if method.spec.kind == "waveform":
            method.model.save_pretrained(out_dir)
        else:
            method.backbone.save(out_dir)
        (out_dir / INPUT_FILE).write_text(json.dumps(method.spec.__dict__, indent=1))

    def load_encoder(self, init: str, cfg: DomainConfig, shards_dir: Path,
                     pretrained_dir: Path, seed: int) -> Encoder:
        spec = self._spec(cfg)
        model_cfg = self._model_cfg(cfg)
        if init == "generic" and not model_cfg.base_checkpoint:
            raise PipelineError("init `generic` needs model.base_checkpoint in params.yaml")
        if spec.kind == "waveform":
            from ssl_models.audio.wav2vec2 import load_wav2vec2_encoder

            return load_wav2vec2_encoder(init, model_cfg, pretrained_dir, seed, spec)
        from ssl_models.audio.backbones import load_spectrogram_encoder

        return load_spectrogram_encoder(init, model_cfg, pretrained_dir, seed, spec)

    def available_inits(self, cfg: DomainConfig) -> list[str]:
        base = self._section(AudioModelConfig, cfg, "model").base_checkpoint
        return ["ssl", "scratch", "generic"] if base else ["ssl", "scratch"]

    def task_description(self, cfg: DomainConfig, uses_default_data: bool) -> str:
        if uses_default_data:
            from ssl_models.audio.default_data import ATTRIBUTION

            return ("spoken-digit recognition (10 classes, 0-9) on a GENERATED corpus, splits grouped by "
                    "synthetic speaker (accent x voice variant). " + ATTRIBUTION)
        return f"audio clip classification by the `label` column of {cfg.labels}"
