"""Settings of the audio domain's params.yaml sections, and its method registry.

Kept free of torch, librosa and transformers so every stage validates the whole block in
milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssl_models.core.errors import PipelineError
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from ssl_models.core.modules import PretrainMethod

AUDIO_METHODS: Registry[type[PretrainMethod]] = Registry("audio SSL method")
AUDIO_METHODS.register_lazy("tera", "ssl_models.audio.spectrogram_methods:TERA")
AUDIO_METHODS.register_lazy("masked_spectrogram", "ssl_models.audio.spectrogram_methods:MaskedSpectrogramModeling")
AUDIO_METHODS.register_lazy("wav2vec2", "ssl_models.audio.wav2vec2:Wav2Vec2Contrastive")

# What each method reads from the shards: log-mel frames or the raw waveform.
METHOD_INPUTS = {"tera": "log_mel", "masked_spectrogram": "log_mel", "wav2vec2": "waveform"}


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise PipelineError(f"params.yaml {where}: {message}")


@dataclass
class AudioIngestConfig:
    """`ingest:` block: how files become clips."""

    sample_rate: int = 16000  # Hz; every file is mixed down to mono and resampled to this rate
    segment_seconds: float = 10.0  # longer files are cut into segments `file.wav#t=<start>` of this length
    min_seconds: float = 0.1  # shorter clips (and a long file's last bit) are rejected with the reason
    trim_silence: bool = False  # cut leading and trailing silence of each clip (energy-based)
    silence_db: float = 40.0  # below the clip's peak by this many dB counts as silence
    group_by: str = "none"  # folder: a clip's parent folder is its group (speaker) when the labels give none

    def validate(self, where: str) -> None:
        _require(self.group_by in ("none", "folder"), where, f"group_by {self.group_by!r} is not none or folder")
        _require(4000 <= self.sample_rate <= 96000, where, f"sample_rate {self.sample_rate} must be in [4000, 96000] Hz")
        _require(self.segment_seconds > 0 and 0 <= self.min_seconds < self.segment_seconds, where,
                 "segment_seconds must be positive and above min_seconds >= 0")
        _require(self.silence_db > 0, where, "silence_db must be positive")


@dataclass
class AudioPreprocessConfig:
    """`preprocess:` block: the model input stored in the shards."""

    input: str = "log_mel"  # log_mel (tera, masked_spectrogram) | waveform (wav2vec2)
    n_mels: int = 64
    n_fft: int = 400  # samples per STFT window (25 ms at 16 kHz)
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz)
    clip_seconds: float = 1.0  # pretraining crops and labeled clips are cut or padded to this length

    def validate(self, where: str) -> None:
        _require(self.input in ("log_mel", "waveform"), where, f"input {self.input!r} is not log_mel or waveform")
        _require(self.n_mels >= 8 and self.n_fft >= 16 and 0 < self.hop_length <= self.n_fft, where,
                 "need n_mels >= 8, n_fft >= 16 and 0 < hop_length <= n_fft")
        _require(self.clip_seconds > 0, where, "clip_seconds must be positive")


@dataclass
class AudioModelConfig:
    """`model:` block: the backbone."""

    base_checkpoint: str | None = None  # a local folder written by a previous pretrain (models/<domain>/pretrain/encoder)
                                        # or, for wav2vec2, a local Hugging Face Wav2Vec2 folder
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    patch_frames: int = 2  # spectrogram backbones: frames per token (SSAST's frame-based patches)
    patch_mels: int = 0  # mel bins per token; 0 = all bins (a token spans the whole frequency axis)
    dropout: float = 0.0
    pool_segments: int = 1  # clip embedding: means over this many equal time stretches, concatenated
                            # (1: the plain mean; 4 keeps the order of sounds, which tells keywords apart)
    clip_mean: bool = False  # spectrogram backbones: subtract each clip's mean per mel bin (cepstral mean norm.)
    cpu_threads: int = 0  # torch threads for training and embedding; 0 = torch's default. 1 suits
                          # small models on a busy CPU (threads of tiny matrix products mostly wait)

    def validate(self, where: str) -> None:
        _require(self.hidden_size % self.num_heads == 0, where, "hidden_size must be divisible by num_heads")
        _require(self.pool_segments >= 1, where, "pool_segments must be at least 1")
        _require(self.cpu_threads >= 0, where, "cpu_threads must be >= 0 (0: torch's default)")
        _require(self.num_layers > 0 and self.patch_frames > 0 and self.patch_mels >= 0, where,
                 "num_layers and patch_frames must be positive, patch_mels >= 0")


@dataclass
class SpokenDigitsDefaultConfig:
    """`default_data:` block: the generated spoken-digit corpus (espeak-ng voices)."""

    speakers: int = 24  # voices (accent x voice variant), each a group
    takes: int = 3  # renditions of each digit per speaker, at different speeds and pitches
    sentences: bool = True  # also an unlabeled read passage per speaker (a longer file, segmented)

    def validate(self, where: str) -> None:
        _require(2 <= self.speakers <= 48 and self.takes >= 1, where, "speakers must be in [2, 48] and takes >= 1")
