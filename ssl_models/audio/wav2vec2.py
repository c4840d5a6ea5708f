"""wav2vec 2.0 contrastive pretraining on raw waveforms, with `transformers`.

Baevski, Zhou, Mohamed and Auli, "wav2vec 2.0: A Framework for Self-Supervised Learning of
Speech Representations", NeurIPS 2020. A convolutional feature encoder turns the waveform into
frames; spans of frames are masked, and the Transformer's output at each masked frame must pick
its own quantised frame among distractors from the same clip (plus a codebook-diversity term).
Uses `Wav2Vec2ForPreTraining` and transformers' own mask and negative samplers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from ssl_models.audio.backbones import segment_pool
from ssl_models.audio.config import AUDIO_METHODS, AudioModelConfig
from ssl_models.audio.features import InputSpec, decode_row, pad_batch
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder, PretrainMethod

transformers.logging.set_verbosity_error()


def small_config(model_cfg: AudioModelConfig) -> Wav2Vec2Config:
    """A small wav2vec2: 7 convolutions of 32 channels (320x down-sampling: 50 frames/s at 16 kHz)."""
    return Wav2Vec2Config(
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
    frames = model._get_feature_vector_attention_mask(hidden.shape[1], batch["attention_mask"])
    return segment_pool(hidden, torch.arange(hidden.shape[1], device=hidden.device), frames.sum(1), segments)


@AUDIO_METHODS.register("wav2vec2")
class Wav2Vec2Contrastive(PretrainMethod):
    """Usage: `loss = method(method.collate(rows))`; masks and negatives draw from numpy's global
    RNG (transformers' samplers), which the pretrain stage seeds and checkpoints."""

    def __init__(self, model: Wav2Vec2ForPreTraining, spec: InputSpec, mask_probability: float = 0.5,
                 mask_length: int = 4, gumbel_temperature: float = 1.0) -> None:
        super().__init__()
        self.pool_segments = int(getattr(model.config, "pool_segments", 1))
        self.model, self.spec = model, spec
        self.mask_probability, self.mask_length = mask_probability, mask_length
        self.model.set_gumbel_temperature(gumbel_temperature)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_waveforms(samples, self.spec)
        n_frames = int(self.model._get_feat_extract_output_lengths(batch["input_values"].shape[1]))
        frames_mask = self.model._get_feature_vector_attention_mask(n_frames, batch["attention_mask"])
        masked = _compute_mask_indices((len(samples), n_frames), self.mask_probability, self.mask_length,
                                       attention_mask=frames_mask, min_masks=2)
        negatives = _sample_negative_indices((len(samples), n_frames), self.model.config.num_negatives,
                                             masked & frames_mask.numpy().astype(bool))
        batch["mask_time_indices"] = torch.from_numpy(masked)
        batch["sampled_negative_indices"] = torch.from_numpy(negatives).long()
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model(batch["input_values"], attention_mask=batch["attention_mask"],
                            mask_time_indices=batch["mask_time_indices"],
                            sampled_negative_indices=batch["sampled_negative_indices"])
        # transformers sums over masked frames; the mean keeps the scale independent of batch size
        return output.loss / batch["mask_time_indices"].sum().clamp(min=1)

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return pooled(self.model.wav2vec2, collate_waveforms(samples, self.spec), self.pool_segments)


class Wav2Vec2Encoder(Encoder):
    def __init__(self, model: Wav2Vec2Model, spec: InputSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.pool_segments = int(getattr(model.config, "pool_segments", 1))
        self.dim = int(model.config.hidden_size) * self.pool_segments

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_waveforms(samples, self.spec)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled(self.model, batch, self.pool_segments)

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)


def _checkpoint_folder(reference: str) -> Path:
    path = Path(reference)
    if not (path / "config.json").exists():
        raise PipelineError(f"model.base_checkpoint {reference!r}: no Hugging Face wav2vec2 folder (config.json)")
    return path


def build_wav2vec2(model_cfg: AudioModelConfig) -> Wav2Vec2ForPreTraining:
    """From the base checkpoint when one is set (continued pretraining), else a small model from scratch."""
    if model_cfg.base_checkpoint:
        model = Wav2Vec2ForPreTraining.from_pretrained(_checkpoint_folder(model_cfg.base_checkpoint))
        model.config.pool_segments = model_cfg.pool_segments
        return model
    return Wav2Vec2ForPreTraining(small_config(model_cfg))


def load_wav2vec2_encoder(init: str, model_cfg: AudioModelConfig, pretrained_dir: Path, seed: int,
                          spec: InputSpec) -> Wav2Vec2Encoder:
    if init == "generic":
        model = Wav2Vec2Model.from_pretrained(_checkpoint_folder(str(model_cfg.base_checkpoint)))
        model.config.pool_segments = model_cfg.pool_segments
    elif init == "ssl":
        model = Wav2Vec2Model.from_pretrained(pretrained_dir)
    else:
        torch.manual_seed(seed)
        model = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(pretrained_dir))
    return Wav2Vec2Encoder(model, spec)
