"""The audio backbones and their encoder wrappers: the spectrogram backbone (a small Transformer
over log-mel patches) and wav2vec2 (transformers' `Wav2Vec2Model`) over raw waveforms.

Tokens are patches of `patch_frames` x `patch_mels` log-mel bins; with all mel bins in a patch
they are SSAST's frame-based patches, which Gong et al. (AAAI 2022) found best for speech.
The per-bin normalisation statistics of the training split are buffers of the model, saved
with its weights.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_models.audio.config import AudioModelConfig
from ssl_models.audio.features import STORAGE_DTYPE, InputSpec, decode_row, pad_batch, stored_steps
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder

if TYPE_CHECKING:
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model

    from ssl_models.core.config import DomainConfig

CONFIG_FILE, WEIGHTS_FILE = "audio_backbone.json", "model.safetensors"


class SpectrogramTransformer(nn.Module):
    """Patch embedding + learned positions + pre-norm Transformer encoder over log-mel clips."""

    def __init__(self, n_mels: int, clip_frames: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, patch_frames: int, patch_mels: int, dropout: float = 0.0,
                 clip_mean: bool = False, pool_segments: int = 1, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__()
        patch_mels = patch_mels or n_mels
        if n_mels % patch_mels:
            raise PipelineError(f"model.patch_mels {patch_mels} must divide preprocess.n_mels {n_mels}")
        self.config = {"n_mels": n_mels, "clip_frames": clip_frames, "hidden_size": hidden_size,
                       "num_layers": num_layers, "num_heads": num_heads, "intermediate_size": intermediate_size,
                       "patch_frames": patch_frames, "patch_mels": patch_mels, "dropout": dropout,
                       "clip_mean": clip_mean, "pool_segments": pool_segments}
        self.clip_mean, self.pool_segments = clip_mean, pool_segments
        self.patch_frames, self.patch_mels = patch_frames, patch_mels
        self.time_patches = -(-clip_frames // patch_frames)
        self.mel_patches = n_mels // patch_mels
        self.patch_dim = patch_frames * patch_mels
        self.register_buffer("mean", torch.tensor(mean or [0.0] * n_mels))
        self.register_buffer("std", torch.tensor(std or [1.0] * n_mels))
        self.patch_embedding = nn.Linear(self.patch_dim, hidden_size)
        self.position = nn.Parameter(torch.randn(1, self.time_patches * self.mel_patches, hidden_size) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, intermediate_size, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size
        self.dim = hidden_size * pool_segments

    def normalise(self, log_mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Standardised with the training split's statistics, minus each clip's own mean per
        mel bin when `clip_mean` (cepstral mean normalisation: removes the channel and much of
        the speaker's timbre), and zero past each clip's end."""
        log_mel = log_mel.float()  # stored float16 frames, widened exactly
        valid = (~frame_padding(lengths, log_mel.shape[1])).unsqueeze(-1).to(log_mel.dtype)
        frames = (log_mel - self.mean) / self.std * valid
        if self.clip_mean:
            frames = (frames - frames.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)) * valid
        return frames

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """[batch, frames, mels] -> [batch, tokens, patch_dim], time-major; frames padded with zeros."""
        batch, n_frames, _ = frames.shape
        missing = self.time_patches * self.patch_frames - n_frames
        if missing > 0:
            frames = nn.functional.pad(frames, (0, 0, 0, missing))
        frames = frames[:, : self.time_patches * self.patch_frames]
        patches = frames.reshape(batch, self.time_patches, self.patch_frames, self.mel_patches, self.patch_mels)
        return patches.permute(0, 1, 3, 2, 4).reshape(batch, -1, self.patch_dim)

    def token_padding(self, lengths: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] True where a token starts past the clip's end."""
        starts = torch.arange(self.time_patches, device=lengths.device) * self.patch_frames
        padded = starts[None, :] >= lengths[:, None]
        return padded.repeat_interleave(self.mel_patches, dim=1)

    def encode_tokens(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(tokens + self.position[:, : tokens.shape[1]], src_key_padding_mask=padding)
        return self.norm(hidden)

    def forward(self, normalised: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [batch, tokens, hidden] of normalised frames, and the padding mask."""
        padding = self.token_padding(lengths)
        return self.encode_tokens(self.patch_embedding(self.patchify(normalised)), padding), padding

    def pool(self, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """[batch, pool_segments * hidden]: the mean over each of `pool_segments` equal stretches
        of the clip's real tokens, in time order."""
        time_index = torch.arange(hidden.shape[1], device=hidden.device) // self.mel_patches
        n_valid = (~padding).sum(1) // self.mel_patches
        return segment_pool(hidden, time_index, n_valid, self.pool_segments)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {**self.config, "mean": self.mean.tolist(), "std": self.std.tolist()}
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out_dir / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path, weights: bool = True) -> SpectrogramTransformer:
        if not (folder / CONFIG_FILE).exists():
            raise PipelineError(f"{folder} holds no spectrogram backbone ({CONFIG_FILE}); set model.base_checkpoint "
                                "to the `encoder` folder of an earlier audio pretraining")
        model = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        if weights:
            from ssl_models.core.domain import load_checkpoint_strictly

            load_checkpoint_strictly(model, load_file(str(folder / WEIGHTS_FILE)), folder,
                                     "the spectrogram backbone its audio_backbone.json describes",
                                     "its weights and audio_backbone.json do not belong together: save it again")
        return model


def collate_spectrograms(samples: list[dict[str, Any]], spec: InputSpec) -> dict[str, torch.Tensor]:
    """`log_mel` as stored (float16: half the bytes to hand over from a loader worker and to copy to
    a GPU; `normalise` widens it, exactly) and `lengths`."""
    frames, lengths = pad_batch([stored_steps(s, spec.width) for s in samples], spec.clip_steps, STORAGE_DTYPE)
    return {"log_mel": torch.from_numpy(frames), "lengths": torch.from_numpy(lengths)}


class SpectrogramEncoder(Encoder):
    """Mean of the backbone's hidden states over the clip's tokens."""

    def __init__(self, backbone: SpectrogramTransformer, spec: InputSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.dim = backbone.dim

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_spectrograms(samples, self.spec)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, padding = self.backbone(self.backbone.normalise(batch["log_mel"], batch["lengths"]), batch["lengths"])
        return self.backbone.pool(hidden, padding)

    def save(self, out_dir: Path) -> None:
        self.backbone.save(out_dir)
        self.spec.save(out_dir)


def segment_pool(hidden: torch.Tensor, time_index: torch.Tensor, n_valid: torch.Tensor,
                 segments: int) -> torch.Tensor:
    """Means of `hidden` [batch, tokens, dim] over `segments` equal time stretches of each clip's
    first `n_valid` time steps (a stretch holds at least one step), concatenated: [batch, segments * dim].
    One segment is the plain mean; more keep the order of events, which tells keywords apart."""
    n_valid = n_valid.clamp(min=1)[:, None]
    pooled = []
    for k in range(segments):
        start = n_valid * k // segments
        end = torch.maximum(n_valid * (k + 1) // segments, start + 1)
        inside = ((time_index[None, :] >= start) & (time_index[None, :] < end)).unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * inside).sum(1) / inside.sum(1).clamp(min=1.0))
    return torch.cat(pooled, dim=1)


def frame_padding(lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[batch, frames] True past each clip's end."""
    return torch.arange(n_frames, device=lengths.device)[None, :] >= lengths[:, None]


def stats_of(shards_dir: Path) -> tuple[list[float] | None, list[float] | None]:
    path = shards_dir / "normalisation.json"
    if not path.exists():
        return None, None
    stats = json.loads(path.read_text())
    return stats["mean"], stats["std"]


def build_spectrogram_transformer(cfg: DomainConfig, shards_dir: Path) -> SpectrogramEncoder:
    """The `spectrogram_transformer` backbone to pretrain: from `model.base_checkpoint` (continued
    pretraining) or from scratch; either way normalised with this corpus' training-split statistics."""
    spec, model_cfg = InputSpec.from_config(cfg.ingest, cfg.preprocess), cfg.model
    mean, std = stats_of(shards_dir)
    if model_cfg.base_checkpoint:
        backbone = base_spectrogram_transformer(cfg.resolve(model_cfg.base_checkpoint), model_cfg.dropout)
        if backbone.config["n_mels"] != spec.width:
            raise PipelineError(f"model.base_checkpoint has {backbone.config['n_mels']} mel bins; "
                                f"set preprocess.n_mels: {backbone.config['n_mels']}")
        if mean is not None:
            backbone.mean.copy_(torch.tensor(mean))
            backbone.std.copy_(torch.tensor(std))
        return SpectrogramEncoder(backbone, spec)
    return SpectrogramEncoder(SpectrogramTransformer(
        n_mels=spec.width, clip_frames=spec.clip_steps, hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
        intermediate_size=model_cfg.intermediate_size, patch_frames=model_cfg.patch_frames,
        patch_mels=model_cfg.patch_mels, dropout=model_cfg.dropout, clip_mean=model_cfg.clip_mean,
        pool_segments=model_cfg.pool_segments, mean=mean, std=std), spec)


def base_spectrogram_transformer(folder: Path, dropout: float) -> SpectrogramTransformer:
    """The spectrogram backbone in `folder`, strictly loaded: the `encoder` folder of an earlier
    pretraining (audio_backbone.json + model.safetensors) or this project's export of one (timm's
    save_for_hf layout, its config.json with `ssl_pipeline_features`)."""
    config_file = folder / "config.json"
    if not (folder / CONFIG_FILE).exists() and config_file.exists():
        config = json.loads(config_file.read_text())
        if "ssl_pipeline_features" not in config or not (folder / WEIGHTS_FILE).exists():
            raise PipelineError(f"model.base_checkpoint {str(folder)!r}: a config.json without this project's "
                                f"spectrogram features (ssl_pipeline_features) or without {WEIGHTS_FILE}; give the "
                                "encoder folder of an audio pretraining or its export")
        return from_timm(config, load_file(str(folder / WEIGHTS_FILE)), folder, dropout)
    return SpectrogramTransformer.load(folder)


def quiet_transformers() -> Any:
    """transformers (its logging quietened), imported by the wav2vec2 code only: the spectrogram
    backbone and its methods start without it (several seconds per process here)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading a small checkpoint takes milliseconds
    return transformers


def small_config(model_cfg: AudioModelConfig) -> Wav2Vec2Config:
    """A small wav2vec2: 7 convolutions of 32 channels (320x down-sampling: 50 frames/s at 16 kHz)."""
    return quiet_transformers().Wav2Vec2Config(
        hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads, intermediate_size=model_cfg.intermediate_size,
        conv_dim=(32,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        num_codevector_groups=2, num_codevectors_per_group=32, codevector_dim=64, proj_codevector_dim=64,
        num_negatives=20, hidden_dropout=model_cfg.dropout, attention_dropout=model_cfg.dropout,
        activation_dropout=0.0, feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, diversity_loss_weight=0.1,
        # mask_time_prob > 0 makes transformers create the mask embedding; mild SpecAugment in fine-tuning
        mask_time_prob=0.05, mask_time_length=2, pool_segments=model_cfg.pool_segments)


def collate_waveforms(samples: list[dict[str, Any]], spec: InputSpec) -> dict[str, torch.Tensor]:
    """Padded waveforms, each normalised to zero mean and unit variance over its own samples
    (as Wav2Vec2FeatureExtractor does), and the attention mask."""
    waves, lengths = pad_batch([decode_row(s, 1) for s in samples], spec.clip_steps)
    waves = waves[..., 0]
    mask = np.arange(waves.shape[1])[None, :] < lengths[:, None]
    for index, length in enumerate(lengths):
        clip = waves[index, :length]
        waves[index, :length] = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
    return {"input_values": torch.from_numpy(waves), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def pooled(model: Wav2Vec2Model, batch: dict[str, torch.Tensor], segments: int) -> torch.Tensor:
    hidden = model(batch["input_values"], attention_mask=batch["attention_mask"]).last_hidden_state
    # the frames the convolutions make of each clip's samples (a clip shorter than one frame pools
    # its first frame; transformers' own frame mask wraps its index round to the end there)
    n_valid = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(1))
    return segment_pool(hidden, torch.arange(hidden.shape[1], device=hidden.device), n_valid, segments)


class Wav2Vec2Encoder(Encoder):
    """Pooled hidden states of a wav2vec2 model. `model` is the bare `Wav2Vec2Model` (fine-tuning)
    or, to pretrain, `Wav2Vec2ForPreTraining`, whose quantiser and projections are then saved
    with it, so that continued pretraining from the saved folder keeps them."""

    def __init__(self, model: Wav2Vec2Model | Wav2Vec2ForPreTraining, spec: InputSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.pool_segments = int(getattr(model.config, "pool_segments", 1))
        self.dim = int(model.config.hidden_size) * self.pool_segments

    @property
    def backbone(self) -> Wav2Vec2Model:
        return getattr(self.model, "wav2vec2", self.model)  # Wav2Vec2ForPreTraining holds the bare model there

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_waveforms(samples, self.spec)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled(self.backbone, batch, self.pool_segments)

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.spec.save(out_dir)


def _checkpoint_folder(path: Path) -> Path:
    if not (path / "config.json").exists():
        raise PipelineError(f"model.base_checkpoint {str(path)!r}: no Hugging Face wav2vec2 folder (config.json)")
    return path


def _strictly_from_pretrained(model_class: Any, path: Path) -> Any:
    """`model_class` from the Hugging Face wav2vec2 folder `path` (config.json + model.safetensors or
    pytorch_model.bin), its encoder strictly: every weight with its shape, or one line naming them.
    The pretraining heads (quantiser, projections) start new where the folder is a bare encoder."""
    from ssl_models.core.domain import check_pretrained_loading

    folder = _checkpoint_folder(path)
    try:
        model, loading = model_class.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:  # no weights file, or a config.json of another model type
        raise PipelineError(f"model.base_checkpoint {str(path)!r}: not a Hugging Face wav2vec2 folder "
                            f"({' '.join(str(error).split())[:200]})") from None
    check_pretrained_loading(model, loading, folder, f"a {model_class.__name__} of its config.json",
                             "give a wav2vec2 checkpoint folder whose weights match its config.json")
    return model


def build_wav2vec2(cfg: DomainConfig, shards_dir: Path) -> Wav2Vec2Encoder:
    """The `wav2vec2` backbone to pretrain (with its pretraining heads): from `model.base_checkpoint`
    when one is set (continued pretraining), else a small model from scratch."""
    spec, pretraining = InputSpec.from_config(cfg.ingest, cfg.preprocess), quiet_transformers().Wav2Vec2ForPreTraining
    if cfg.model.base_checkpoint:
        model = _strictly_from_pretrained(pretraining, cfg.resolve(cfg.model.base_checkpoint))
        model.config.pool_segments = cfg.model.pool_segments
        return Wav2Vec2Encoder(model, spec)
    return Wav2Vec2Encoder(pretraining(small_config(cfg.model)), spec)


def saved_encoder(cfg: DomainConfig, folder: Path, weights: bool = True) -> Encoder:
    """The `model.backbone` encoder saved in `folder` (by `save`): its architecture and weights, or
    without `weights` its architecture (and normalisation) randomly initialised."""
    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    if cfg.model.backbone == "wav2vec2":
        transformers = quiet_transformers()
        model = (transformers.Wav2Vec2Model.from_pretrained(folder) if weights
                 else transformers.Wav2Vec2Model(transformers.Wav2Vec2Config.from_pretrained(folder)))
        return Wav2Vec2Encoder(model, spec)
    return SpectrogramEncoder(SpectrogramTransformer.load(folder, weights=weights), spec)


def generic_encoder(cfg: DomainConfig) -> Encoder:
    """`model.base_checkpoint` as it is (a wav2vec2 checkpoint pooled into `model.pool_segments`)."""
    folder = cfg.resolve(str(cfg.model.base_checkpoint))
    if cfg.model.backbone != "wav2vec2":
        return SpectrogramEncoder(base_spectrogram_transformer(folder, cfg.model.dropout),
                                  InputSpec.from_config(cfg.ingest, cfg.preprocess))
    model = _strictly_from_pretrained(quiet_transformers().Wav2Vec2Model, folder)
    model.config.pool_segments = cfg.model.pool_segments
    return Wav2Vec2Encoder(model, InputSpec.from_config(cfg.ingest, cfg.preprocess))


# The export (`ssl-pipeline export audio`). The spectrogram backbone is handed over as a timm
# VisionTransformer: its blocks are the same pre-norm attention + GELU MLP, a patch of
# patch_frames x patch_mels is a one-channel "image" patch (the linear patch embedding is
# timm's convolution with the same weights), and timm takes a key-padding mask (`attn_mask`),
# so clips shorter than the window embed as in the pipeline. timm loads it from the folder
# (`timm.create_model("local-dir:...")`); transformers' AST would need square patches and a
# class token. wav2vec2 is a Hugging Face folder (`Wav2Vec2Model` and its feature extractor).

# What both snippets pool with: the pipeline's own `segment_pool`, its source as it is.
_POOL_SNIPPET = "\n" + inspect.getsource(segment_pool)

# What the card gives to embed log-mel clips as the pipeline does, with timm alone.
SPECTROGRAM_SNIPPET = '''import functools, json, numpy as np, timm, torch
from safetensors.torch import load_file

config = json.load(open(f"{FOLDER}/config.json"))
features, args = config["ssl_pipeline_features"], config["model_args"]
model = timm.create_model(config["architecture"], pretrained=False, **args,
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=features["layer_norm_eps"]))
model.load_state_dict(load_file(f"{FOLDER}/model.safetensors"), strict=True)
model.eval()
mean, std = torch.tensor(features["mean"]), torch.tensor(features["std"])
(height, n_mels), (patch_frames, patch_mels) = args["img_size"], args["patch_size"]

def log_mel(samples):
    """Mono float32 samples at features["sample_rate"] -> [frames, n_mels], as the pipeline computes them."""
    import librosa
    power = np.abs(librosa.stft(samples, n_fft=features["n_fft"], hop_length=features["hop_length"])) ** 2
    mel = librosa.filters.mel(sr=features["sample_rate"], n_fft=features["n_fft"], n_mels=n_mels) @ power
    return np.log(mel + 1e-6).T.astype(np.float32)
''' + _POOL_SNIPPET + '''
@torch.no_grad()
def embed(clips):
    """clips: log-mel arrays [frames, n_mels] (`log_mel`); the first clip_frames of each are used."""
    lengths = torch.tensor([min(len(clip), features["clip_frames"]) for clip in clips])
    x = torch.zeros(len(clips), height, n_mels)
    for i, clip in enumerate(clips):
        x[i, :lengths[i]] = torch.as_tensor(np.asarray(clip, dtype=np.float32)[:lengths[i]])
    valid = (torch.arange(height)[None, :] < lengths[:, None]).unsqueeze(-1).float()
    x = (x - mean) / std * valid
    if features["clip_mean"]:  # each clip's own mean per mel bin removed
        x = (x - x.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)) * valid
    mel_patches = n_mels // patch_mels
    padded = (torch.arange(height // patch_frames)[None, :] * patch_frames >= lengths[:, None])
    padded = padded.repeat_interleave(mel_patches, dim=1)  # [clips, tokens]: token past the clip's end
    hidden = model.forward_features(x[:, None], attn_mask=~padded[:, None, None, :])
    time_index = torch.arange(hidden.shape[1]) // mel_patches
    return segment_pool(hidden, time_index, (~padded).sum(1) // mel_patches, features["pool_segments"])
'''

# What the card gives to embed waveforms as the pipeline does, with transformers alone.
WAV2VEC2_SNIPPET = '''import json, numpy as np, torch
from transformers import AutoFeatureExtractor, AutoModel

model = AutoModel.from_pretrained(FOLDER).eval()
extractor = AutoFeatureExtractor.from_pretrained(FOLDER)
settings = json.load(open(f"{FOLDER}/embedding.json"))

def frames(samples):
    """How many frames the convolutional feature encoder makes of `samples` samples."""
    for kernel, stride in zip(model.config.conv_kernel, model.config.conv_stride):
        samples = torch.div(samples - kernel, stride, rounding_mode="floor") + 1
    return samples
''' + _POOL_SNIPPET + '''
@torch.no_grad()
def embed(waveforms):
    """waveforms: mono float32 arrays at the extractor's sampling_rate; the first clip_samples of each are used."""
    inputs = extractor([np.asarray(w, dtype=np.float32) for w in waveforms], sampling_rate=extractor.sampling_rate,
                       padding="max_length", max_length=settings["clip_samples"], truncation=True,
                       return_attention_mask=True, return_tensors="pt")
    hidden = model(**inputs).last_hidden_state
    n_valid = frames(inputs["attention_mask"].sum(1))
    return segment_pool(hidden, torch.arange(hidden.shape[1]), n_valid, settings["pool_segments"])
'''


def timm_description(backbone: SpectrogramTransformer) -> dict[str, Any]:
    """The timm VisionTransformer that computes what `backbone` does (weights by `timm_state_dict`)."""
    config = backbone.config
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    # timm sizes the MLP as int(width * mlp_ratio): half a unit more keeps a float's rounding from
    # losing one (intermediate / hidden alone gives 487 for 488 over 56, and thousands more)
    return {"architecture": "vit_base_patch16_224",
            "model_args": {"img_size": [backbone.time_patches * backbone.patch_frames, config["n_mels"]],
                           "patch_size": [backbone.patch_frames, backbone.patch_mels], "in_chans": 1,
                           "embed_dim": hidden, "depth": config["num_layers"], "num_heads": config["num_heads"],
                           "mlp_ratio": (intermediate + 0.5) / hidden, "qkv_bias": True, "class_token": False,
                           "global_pool": "", "num_classes": 0}}


def timm_names(num_layers: int) -> dict[str, str]:
    """Our state dict's names -> timm VisionTransformer's, for a backbone of `num_layers` blocks
    (the normalisation buffers `mean`/`std` have no place in timm: they go to the config)."""
    names = {"position": "pos_embed", "patch_embedding.weight": "patch_embed.proj.weight",
             "patch_embedding.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    for index in range(num_layers):
        ours, theirs = f"encoder.layers.{index}.", f"blocks.{index}."
        for module, timm_module in (("norm1", "norm1"), ("norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                                    ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                names[f"{ours}{module}.{kind}"] = f"{theirs}{timm_module}.{kind}"
        names[f"{ours}self_attn.in_proj_weight"] = f"{theirs}attn.qkv.weight"
        names[f"{ours}self_attn.in_proj_bias"] = f"{theirs}attn.qkv.bias"
    return names


def timm_state_dict(backbone: SpectrogramTransformer) -> dict[str, torch.Tensor]:
    """`backbone`'s weights under timm VisionTransformer's names (the normalisation buffers go to the
    config); the patch embedding becomes timm's one-channel convolution of the same weights."""
    state = backbone.state_dict()
    weights = {theirs: state[ours] for ours, theirs in timm_names(len(backbone.encoder.layers)).items()}
    weights["patch_embed.proj.weight"] = weights["patch_embed.proj.weight"].reshape(
        backbone.hidden_size, 1, backbone.patch_frames, backbone.patch_mels)
    return {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}


def from_timm(config: dict[str, Any], weights: dict[str, torch.Tensor], folder: Path,
              dropout: float = 0.0) -> SpectrogramTransformer:
    """The inverse of `timm_state_dict` and `timm_description`: the backbone an export's config.json
    (`model_args`, `ssl_pipeline_features`) describes, its statistics and weights loaded strictly."""
    from ssl_models.core.domain import load_exported_weights, require_exact_load

    args, features = config["model_args"], config["ssl_pipeline_features"]
    hidden, (patch_frames, patch_mels) = args["embed_dim"], args["patch_size"]
    backbone = SpectrogramTransformer(
        n_mels=features["n_mels"], clip_frames=features["clip_frames"], hidden_size=hidden,
        num_layers=args["depth"], num_heads=args["num_heads"],
        intermediate_size=int(hidden * args["mlp_ratio"]),  # timm's own rule for the MLP's width
        patch_frames=patch_frames, patch_mels=patch_mels, dropout=dropout, clip_mean=features["clip_mean"],
        pool_segments=features["pool_segments"], mean=features["mean"], std=features["std"])
    if backbone.norm.eps != features["layer_norm_eps"]:
        raise PipelineError(f"the export {folder}: layer norms with eps {features['layer_norm_eps']}; the spectrogram "
                            f"backbone's are {backbone.norm.eps}")
    names = timm_names(args["depth"])
    require_exact_load(folder, sorted(set(names.values()) - set(weights)), sorted(set(weights) - set(names.values())))
    state = {ours: weights[theirs] for ours, theirs in names.items()}
    state["patch_embedding.weight"] = state["patch_embedding.weight"].reshape(hidden, patch_frames * patch_mels)
    load_exported_weights(backbone, {**state, "mean": backbone.mean, "std": backbone.std}, folder)
    return backbone


def exported_encoder(cfg: DomainConfig, folder: Path) -> Encoder:
    """The inverse of `export`: the encoder in an export folder, strictly loaded, for clips that `cfg`'s
    ingest and preprocess sections make (checked against the export's own feature settings)."""
    from ssl_models.core.domain import require_exact_load

    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    if cfg.model.backbone == "wav2vec2":
        settings = json.loads((folder / "embedding.json").read_text())
        _require_same(folder, {"clip_samples": spec.clip_steps}, settings)
        model, loading = quiet_transformers().Wav2Vec2Model.from_pretrained(folder, output_loading_info=True)
        require_exact_load(folder, loading["missing_keys"], loading["unexpected_keys"])
        model.config.pool_segments = settings["pool_segments"]
        return Wav2Vec2Encoder(model, spec)
    config = json.loads((folder / "config.json").read_text())
    features = config["ssl_pipeline_features"]
    _require_same(folder, {"sample_rate": spec.sample_rate, "n_fft": spec.n_fft, "hop_length": spec.hop_length,
                           "n_mels": spec.width, "clip_frames": spec.clip_steps}, features)
    return SpectrogramEncoder(from_timm(config, load_file(str(folder / WEIGHTS_FILE)), folder, cfg.model.dropout),
                              spec)


def _require_same(folder: Path, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    differ = {key: (value, theirs.get(key)) for key, value in ours.items() if theirs.get(key) != value}
    if differ:
        raise PipelineError(f"the export {folder}: its feature settings differ from its ssl_pipeline.json's "
                            f"({', '.join(f'{k} {b} there, {a} here' for k, (a, b) in differ.items())}); export the "
                            "encoder again")


def export(encoder: Encoder, out_dir: Path) -> dict[str, Any]:
    """Write `encoder` into `out_dir`: a timm folder (spectrogram backbone) or a Hugging Face
    wav2vec2 folder, with the feature settings beside the weights. Returns what the card says."""
    spec = encoder.spec
    if isinstance(encoder, Wav2Vec2Encoder):
        transformers = quiet_transformers()
        encoder.backbone.save_pretrained(out_dir)  # the bare Wav2Vec2Model: no quantiser, no projections
        transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=spec.sample_rate, padding_value=0.0,
                                              do_normalize=True, return_attention_mask=True).save_pretrained(out_dir)
        settings = {"clip_samples": spec.clip_steps, "pool_segments": encoder.pool_segments}
        (out_dir / "embedding.json").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return {"library": "transformers", "format": "a Hugging Face wav2vec2 folder (AutoModel, AutoFeatureExtractor)",
                "snippet": WAV2VEC2_SNIPPET, "inputs": f"mono waveforms at {spec.sample_rate} Hz"}
    backbone = encoder.backbone
    save_file(timm_state_dict(backbone), str(out_dir / WEIGHTS_FILE))
    config = {**timm_description(backbone), "num_classes": 0, "num_features": backbone.hidden_size,
              "pretrained_cfg": {"input_size": [1, *timm_description(backbone)["model_args"]["img_size"]],
                                 "mean": [0.0], "std": [1.0], "num_classes": 0},
              "ssl_pipeline_features": {"sample_rate": spec.sample_rate, "n_fft": spec.n_fft,
                                        "hop_length": spec.hop_length, "n_mels": spec.width,
                                        "clip_frames": spec.clip_steps, "log_offset": 1e-6,
                                        "mean": backbone.mean.tolist(), "std": backbone.std.tolist(),
                                        "clip_mean": backbone.clip_mean, "pool_segments": backbone.pool_segments,
                                        "layer_norm_eps": backbone.norm.eps}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return {"library": "timm", "format": "a timm VisionTransformer folder (save_for_hf layout: config.json, "
            "model.safetensors) over one-channel log-mel patches", "snippet": SPECTROGRAM_SNIPPET,
            "inputs": f"log-mel clips [frames, {spec.width}] (`log_mel(samples)` of {spec.sample_rate} Hz mono audio)"}
