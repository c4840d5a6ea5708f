"""Audio: wav/flac/ogg/mp3 readers, log-mel or waveform shards, TERA, SSAST-style masked
spectrogram modelling and wav2vec2 pretraining, clip classification downstream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ssl_models.audio.config import (
    BACKBONE_INPUTS,
    BACKBONES,
    METHOD_INPUTS,
    METHODS,
    SECTIONS,
    TERAOptions,
    Wav2Vec2Options,
    conv_frames,
)
from ssl_models.audio.default_data import ATTRIBUTION
from ssl_models.audio.readers import AUDIO_SUFFIXES, read_audio_file
from ssl_models.core.config import DomainConfig
from ssl_models.core.domain import Domain, Record, Rejected, rows_by_source
from ssl_models.core.errors import PipelineError

if TYPE_CHECKING:
    from ssl_models.core.domain import Source
    from ssl_models.core.modules import Encoder


class Audio(Domain, module="audio"):
    default_method = "tera"
    name, suffixes, sections, methods, backbones = "audio", AUDIO_SUFFIXES, SECTIONS, METHODS, BACKBONES
    baseline = "ssl_models.audio.baseline"

    def validate(self, cfg: DomainConfig) -> None:
        where, method, backbone = f"domains.{cfg.name}", cfg.pretrain.method, cfg.model.backbone
        needed, options = METHOD_INPUTS[method], cfg.pretrain.options
        fixes = [f"preprocess.input: {needed}"] if cfg.preprocess.input != needed else []
        if BACKBONE_INPUTS[backbone] != needed:
            fixes.append("model.backbone: " + " or ".join(b for b, kind in BACKBONE_INPUTS.items() if kind == needed))
        if fixes:
            raise PipelineError(f"params.yaml {where}: pretrain.method {method} reads {needed} input, but "
                                f"preprocess.input is {cfg.preprocess.input} and model.backbone {backbone} reads "
                                f"{BACKBONE_INPUTS[backbone]}; set {' and '.join(fixes)}")
        n_mels = cfg.preprocess.n_mels
        if needed == "log_mel" and cfg.model.patch_mels and n_mels % cfg.model.patch_mels:
            raise PipelineError(f"params.yaml {where}.model.patch_mels {cfg.model.patch_mels} must divide "
                                f"preprocess.n_mels {n_mels}")
        if isinstance(options, TERAOptions) and options.max_freq_band > n_mels:
            raise PipelineError(f"params.yaml {where}.pretrain.options.max_freq_band {options.max_freq_band} "
                                f"exceeds preprocess.n_mels {n_mels}")
        if isinstance(options, Wav2Vec2Options):
            frames = conv_frames(round(cfg.preprocess.clip_seconds * cfg.ingest.sample_rate))
            if options.mask_length > frames:
                raise PipelineError(f"params.yaml {where}.pretrain.options.mask_length {options.mask_length} "
                                    f"exceeds the {frames} frames of a clip; lower it or raise preprocess.clip_seconds")

    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        yield from read_audio_file(source.paths[0], source.key, cfg.ingest)

    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        from ssl_models.audio.default_data import write_spoken_digits

        options = cfg.default_data
        counts = write_spoken_digits(out_dir, options.speakers, options.takes, options.sentences)
        return {"corpus": "generated speech", **counts}

    def preprocess(self, cfg: DomainConfig, manifest: list[dict[str, Any]], out_dir: Path,
                   locate: Callable[[dict[str, Any]], Source]) -> dict[str, Any]:
        from ssl_models.audio.features import InputSpec
        from ssl_models.audio.shards import write_audio_shards

        spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
        # a source (a file) and its rows at a time, in the manifest's order (ingest wrote a source's
        # rows one after another), each read again and made model input on the stage's engine
        summary = write_audio_shards(cfg, rows_by_source(manifest, locate), spec, out_dir)
        spec.save(out_dir)
        return summary

    def export(self, cfg: DomainConfig, encoder: Encoder, out_dir: Path) -> dict[str, Any]:
        """The spectrogram backbone as a timm VisionTransformer folder, wav2vec2 as a Hugging Face
        folder; the feature settings (sample rate, mel, normalisation statistics) beside the weights."""
        from ssl_models.audio.backbones import export

        return export(encoder, out_dir)

    def load_export(self, cfg: DomainConfig, folder: Path) -> Encoder:
        """The timm folder back into the spectrogram backbone (`from_timm`), or the wav2vec2 folder."""
        from ssl_models.audio.backbones import exported_encoder

        return exported_encoder(cfg, folder)

    def load_pretrained(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        from ssl_models.audio.backbones import saved_encoder

        return saved_encoder(cfg, pretrained_dir)

    def build_scratch(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """The pretrained encoder's architecture and normalisation statistics, random weights."""
        from ssl_models.audio.backbones import saved_encoder

        return saved_encoder(cfg, pretrained_dir, weights=False)

    def build_generic(self, cfg: DomainConfig, shards_dir: Path) -> Encoder:
        from ssl_models.audio.backbones import generic_encoder

        return generic_encoder(cfg)

    # the report's sentence on what the labeled task is
    task_kind = "audio clip classification"
    default_task = ("spoken-digit recognition (10 classes, 0-9) on a GENERATED corpus, splits grouped by synthetic "
                    "speaker (accent x voice variant). " + ATTRIBUTION)
