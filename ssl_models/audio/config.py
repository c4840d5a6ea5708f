"""Settings of the audio domain's params.yaml sections, its SSL methods with their options, and
its backbones.

Kept free of torch, librosa and transformers so every stage validates the whole block in
milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ssl_models.core.config import IngestLimits, ParallelWork, require
from ssl_models.core.registry import Registry

if TYPE_CHECKING:
    from ssl_models.core.modules import PretrainMethod

InputKind = Literal["log_mel", "waveform"]


@dataclass
class TERAOptions:
    """`pretrain.options` of tera: how the input frames are altered."""

    time_fraction: float = 0.15  # share of a clip's frames altered along time, in blocks
    time_block: int = 7  # consecutive frames per block
    max_freq_band: int = 8  # a band of up to this many mel bins is zeroed over the whole clip
    noise_probability: float = 0.1  # share of clips with Gaussian noise added to every frame
    noise_std: float = 0.2  # in units of the normalised frames

    def validate(self, where: str) -> None:
        require(0 < self.time_fraction < 1, f"{where}.time_fraction", "must be in (0, 1)")
        require(self.time_block >= 1, f"{where}.time_block", "must be at least 1 frame")
        require(self.max_freq_band >= 0, f"{where}.max_freq_band", "must be >= 0 mel bins")
        require(0 <= self.noise_probability <= 1, f"{where}.noise_probability", "must be in [0, 1]")
        require(self.noise_std >= 0, f"{where}.noise_std", "must be >= 0")


@dataclass
class MaskedSpectrogramOptions:
    """`pretrain.options` of masked_spectrogram (SSAST)."""

    mask_fraction: float = 0.4  # share of each clip's patch tokens masked
    generative_weight: float = 10.0  # weight of the reconstruction (MSE) term; 10 in the paper

    def validate(self, where: str) -> None:
        require(0 < self.mask_fraction < 1, f"{where}.mask_fraction", "must be in (0, 1)")
        require(self.generative_weight >= 0, f"{where}.generative_weight", "must be >= 0")


@dataclass
class Wav2Vec2Options:
    """`pretrain.options` of wav2vec2."""

    mask_probability: float = 0.5  # chance of a frame starting a masked span (an upper bound on the masked share)
    mask_length: int = 4  # frames per masked span (20 ms each at 16 kHz)
    gumbel_temperature: float = 1.0  # of the quantiser's Gumbel softmax

    def validate(self, where: str) -> None:
        require(0 < self.mask_probability <= 1, f"{where}.mask_probability", "must be in (0, 1]")
        require(self.mask_length >= 1, f"{where}.mask_length", "must be at least 1 frame")
        require(self.gumbel_temperature > 0, f"{where}.gumbel_temperature", "must be positive")


METHODS: Registry[type[PretrainMethod]] = Registry("audio SSL method")
METHODS.register_lazy("tera", "ssl_models.audio.methods:TERA", options=TERAOptions)
METHODS.register_lazy("masked_spectrogram", "ssl_models.audio.methods:MaskedSpectrogramModeling",
                      options=MaskedSpectrogramOptions)
METHODS.register_lazy("wav2vec2", "ssl_models.audio.methods:Wav2Vec2Contrastive", options=Wav2Vec2Options)
METHODS.register_lazy("hubert", "ssl_models.audio.hubert:HuBERT", options="ssl_models.audio.hubert:HuBERTOptions")

BACKBONES: Registry = Registry("audio backbone")
BACKBONES.register_lazy("spectrogram_transformer", "ssl_models.audio.backbones:build_spectrogram_transformer")
BACKBONES.register_lazy("wav2vec2", "ssl_models.audio.backbones:build_wav2vec2")

# What each method and each backbone reads from the shards: log-mel frames or the raw waveform.
METHOD_INPUTS: dict[str, InputKind] = {"tera": "log_mel", "masked_spectrogram": "log_mel", "wav2vec2": "waveform",
                                       "hubert": "log_mel"}
BACKBONE_INPUTS: dict[str, InputKind] = {"spectrogram_transformer": "log_mel", "wav2vec2": "waveform"}
# wav2vec2's feature encoder, transformers' default (kernel, stride) per convolution: 320x fewer frames
WAV2VEC2_CONV_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def conv_frames(samples: int, conv_layers: tuple[tuple[int, int], ...] = WAV2VEC2_CONV_LAYERS) -> int:
    """Frames a wav2vec2 feature encoder makes of `samples` waveform samples."""
    for kernel, stride in conv_layers:
        samples = (samples - kernel) // stride + 1
    return max(0, samples)


@dataclass
class AudioIngestConfig(IngestLimits):
    """`ingest:` block: how files become clips."""

    sample_rate: int = 16000  # Hz; every file is mixed down to mono and resampled to this rate
    segment_seconds: float = 10.0  # longer files are cut into segments `file.wav#t=<start>` of this length
    min_seconds: float = 0.1  # shorter clips (and a long file's last bit) are rejected with the reason
    trim_silence: bool = False  # cut leading and trailing silence of each clip (energy-based)
    silence_db: float = 40.0  # below the clip's peak by this many dB counts as silence
    group_by: Literal["none", "folder"] = "none"  # folder: a clip's parent folder is its group (speaker)
                                                  # when the labels give none
    # frames x channels a file's header may declare, checked before any sample is decoded: a few KB of
    # FLAC or Ogg can declare days of audio (memory stays flat, streamed, but ingest would decode it
    # all). 2^32 samples: 12 hours of 48 kHz stereo, 74 hours of 16 kHz mono
    max_samples: int = 2 ** 32

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.max_samples > 0, f"{where}.max_samples", "must be positive")
        require(4000 <= self.sample_rate <= 96000, f"{where}.sample_rate",
                f"{self.sample_rate} must be in [4000, 96000] Hz")
        require(self.segment_seconds > 0, f"{where}.segment_seconds", "must be positive")
        require(0 <= self.min_seconds < self.segment_seconds, f"{where}.min_seconds",
                "must be >= 0 and below segment_seconds")
        require(self.silence_db > 0, f"{where}.silence_db", "must be positive")


@dataclass
class AudioPreprocessConfig(ParallelWork):
    """`preprocess:` block: the model input stored in the shards (each file's on the stage's
    engine: `workers`, `scheduler`, `chunk_size`)."""

    input: InputKind = "log_mel"  # log_mel (tera, masked_spectrogram, hubert) | waveform (wav2vec2)
    n_mels: int = 64
    n_fft: int = 400  # samples per STFT window (25 ms at 16 kHz)
    hop_length: int = 160  # samples between frames (10 ms at 16 kHz)
    clip_seconds: float = 1.0  # pretraining crops and labeled clips are cut or padded to this length

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.n_mels >= 8, f"{where}.n_mels", "must be at least 8")
        require(self.n_fft >= 16, f"{where}.n_fft", "must be at least 16 samples")
        require(0 < self.hop_length <= self.n_fft, f"{where}.hop_length", "must be in (0, n_fft]")
        require(self.clip_seconds > 0, f"{where}.clip_seconds", "must be positive")


@dataclass
class AudioModelConfig:
    """`model:` block: the backbone."""

    backbone: Literal["spectrogram_transformer", "wav2vec2"] = "spectrogram_transformer"
    # a local folder (relative to the project root) written by a previous pretrain
    # (models/<domain>/pretrain/encoder) or, for wav2vec2, a local Hugging Face Wav2Vec2 folder
    base_checkpoint: str | None = None
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

    def validate(self, where: str) -> None:
        require(self.num_heads > 0 and self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
                f"{where}.hidden_size", "must be positive and divisible by num_heads")
        require(self.num_layers > 0 and self.intermediate_size > 0, f"{where}.num_layers",
                "num_layers and intermediate_size must be positive")
        require(self.patch_frames > 0, f"{where}.patch_frames", "must be positive")
        require(self.patch_mels >= 0, f"{where}.patch_mels", "must be >= 0 (0: all mel bins)")
        require(0 <= self.dropout < 1, f"{where}.dropout", "must be in [0, 1)")
        require(self.pool_segments >= 1, f"{where}.pool_segments", "must be at least 1")


@dataclass
class SpokenDigitsDefaultConfig:
    """`default_data:` block: the generated spoken-digit corpus (espeak-ng voices)."""

    speakers: int = 24  # voices (accent x voice variant), each a group
    takes: int = 3  # renditions of each digit per speaker, at different speeds and pitches
    sentences: bool = True  # also an unlabeled read passage per speaker (a longer file, segmented)

    def validate(self, where: str) -> None:
        require(2 <= self.speakers <= 48, f"{where}.speakers", "must be in [2, 48]")
        require(self.takes >= 1, f"{where}.takes", "must be at least 1")


# The domain's params.yaml sections, each parsed and checked by `load_config` before any stage runs.
SECTIONS = {"ingest": AudioIngestConfig, "preprocess": AudioPreprocessConfig, "model": AudioModelConfig,
            "default_data": SpokenDigitsDefaultConfig}
