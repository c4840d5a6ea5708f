"""wav2vec 2.0 contrastive pretraining on raw waveforms, with `transformers`.

Baevski, Zhou, Mohamed and Auli, "wav2vec 2.0: A Framework for Self-Supervised Learning of
Speech Representations", NeurIPS 2020. A convolutional feature encoder turns the waveform into
frames; spans of frames are masked, and the Transformer's output at each masked frame must pick
its own quantised frame among distractors from the same clip (plus a codebook-diversity term).
Uses the modules of `Wav2Vec2ForPreTraining`, and transformers' own span-mask and negative
samplers, run per clip in the data side. The loss is transformers' (its `forward` steps 1-8)
written out here for two reasons: the quantiser's Gumbel noise comes from each clip's seed (in
the data side, not from torch's global generator inside the forward pass), and the diversity
term measures the codebook use of the global batch (summed over the processes), not that of one
process' share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from ssl_models.audio.backbones import segment_pool
from ssl_models.audio.config import AudioModelConfig, Wav2Vec2Options, conv_frames
from ssl_models.audio.features import InputSpec, decode_row, pad_batch
from ssl_models.core import distributed
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, Encoder, PretrainMethod, generator

if TYPE_CHECKING:
    from ssl_models.core.config import DomainConfig

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
        return self.model.wav2vec2 if isinstance(self.model, Wav2Vec2ForPreTraining) else self.model

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_waveforms(samples, self.spec)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled(self.backbone, batch, self.pool_segments)

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)
        self.spec.save(out_dir)


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded from `seed` for transformers' samplers, restored afterwards."""
    state = np.random.get_state()
    np.random.seed(int(np.random.default_rng(seed).integers(2**32)))
    try:
        yield
    finally:
        np.random.set_state(state)


@dataclass
class SpanMasks(DataSide):
    """Normalised waveforms padded to the clip length and, per clip from its seed, the masked
    frame spans (`mask_time_indices` [batch, frames]), `sampled_negative_indices`
    [batch, frames, negatives]: frames of the same clip, numbered within the clip (the forward
    pass adds the clip's offset in the batch), and the quantiser's Gumbel noise
    `gumbel_noise` [batch, frames, codevectors] (groups x entries per group)."""

    spec: InputSpec
    options: Wav2Vec2Options
    conv_layers: tuple[tuple[int, int], ...]  # (kernel, stride) of the feature encoder's convolutions
    num_negatives: int
    codevectors: int  # num_codevector_groups x num_codevectors_per_group

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate_waveforms(list(rows), self.spec)
        n_frames = conv_frames(self.spec.clip_steps, self.conv_layers)
        masks = np.zeros((len(rows), n_frames), dtype=bool)
        negatives = np.zeros((len(rows), n_frames, self.num_negatives), dtype=np.int64)
        # Gumbel(0, 1) samples, as torch's gumbel_softmax draws them
        noise = torch.stack([-torch.empty(n_frames, self.codevectors).exponential_(generator=generator(seed)).log()
                             for seed in seeds]) if len(rows) else torch.zeros(0, n_frames, self.codevectors)
        for row, (length, seed) in enumerate(zip(batch["attention_mask"].sum(1).tolist(), seeds)):
            real = np.arange(n_frames) < conv_frames(length, self.conv_layers)
            with numpy_seeded(seed):
                mask = _compute_mask_indices((1, n_frames), self.options.mask_probability, self.options.mask_length,
                                             attention_mask=torch.from_numpy(real[None].astype(np.int64)),
                                             min_masks=2)[0] & real
                if mask.sum() < 2:  # a clip too short for a span and a distractor: nothing to learn from it
                    continue
                negatives[row] = _sample_negative_indices((1, n_frames), self.num_negatives, mask[None])[0]
            masks[row] = mask
        return {**batch, "mask_time_indices": torch.from_numpy(masks),
                "sampled_negative_indices": torch.from_numpy(negatives), "gumbel_noise": noise}


class Wav2Vec2Contrastive(PretrainMethod):
    """Usage: `loss = method(method.data_side()(rows, seeds))`; the encoder holds a
    `Wav2Vec2ForPreTraining` (the `wav2vec2` backbone builds one)."""

    backbone_encoder: Wav2Vec2Encoder

    def __init__(self, encoder: Wav2Vec2Encoder, options: Wav2Vec2Options) -> None:
        super().__init__(encoder, options)
        if not isinstance(encoder.model, Wav2Vec2ForPreTraining):
            raise TypeError("wav2vec2 pretraining needs an encoder around Wav2Vec2ForPreTraining")
        encoder.model.set_gumbel_temperature(options.gumbel_temperature)

    def data_side(self) -> SpanMasks:
        config = self.backbone_encoder.model.config
        return SpanMasks(self.backbone_encoder.spec, self.options, tuple(zip(config.conv_kernel, config.conv_stride)),
                         int(config.num_negatives), config.num_codevector_groups * config.num_codevectors_per_group)

    def quantise(self, features: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantised features [batch, frames, codevector_dim], each frame's soft codebook use
        [batch, frames, groups, entries]): transformers' Gumbel quantiser in training, with `noise`."""
        quantiser = self.backbone_encoder.model.quantizer
        batch, frames, _ = features.shape
        logits = quantiser.weight_proj(features).view(batch, frames, quantiser.num_groups, quantiser.num_vars).float()
        soft = ((logits + noise.view_as(logits)) / quantiser.temperature).softmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        probs = (hard - soft.detach() + soft).type_as(features).view(batch * frames, -1, 1)  # straight-through
        codevectors = (probs * quantiser.codevectors).view(batch * frames, quantiser.num_groups, quantiser.num_vars, -1)
        return codevectors.sum(-2).view(batch, frames, -1), logits.softmax(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model, masked = self.backbone_encoder.model, batch["mask_time_indices"]
        outputs = model.wav2vec2(batch["input_values"], attention_mask=batch["attention_mask"],
                                 mask_time_indices=masked)
        predicted = model.project_hid(outputs.last_hidden_state)
        quantised, use = self.quantise(model.dropout_features(outputs.extract_features), batch["gumbel_noise"])
        quantised = model.project_q(quantised.to(model.project_q.weight.dtype))
        # each masked frame picks its quantised frame among distractors of its clip (numbered within the clip)
        n_clips, n_frames, dim = quantised.shape
        offsets = torch.arange(n_clips, device=masked.device)[:, None, None] * n_frames
        distractors = quantised.reshape(-1, dim)[(batch["sampled_negative_indices"] + offsets)[masked]]
        targets = torch.cat([quantised[masked][:, None], distractors], 1)  # [masked frames, 1 + negatives, dim]
        similarity = torch.cosine_similarity(predicted[masked].float()[:, None], targets.float(), dim=-1)
        # a distractor equal to the positive (a codebook used little) is no distractor
        same = (targets == targets[:, :1]).all(-1)
        same[:, 0] = False
        logits = similarity.masked_fill(same, float("-inf")) / model.config.contrastive_logits_temperature
        contrastive = nn.functional.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long),
                                                  reduction="sum")
        # diversity: the perplexity of the codebook use averaged over every process' masked frames
        frames = masked.to(use.dtype)[..., None, None]
        total_use = distributed.gather((use * frames).sum((0, 1))[None]).sum(0)
        total_frames = distributed.gather(masked.sum().to(use.dtype)[None]).sum()
        marginal = total_use / total_frames.clamp(min=1)
        perplexity = torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()
        n_codevectors = model.config.num_codevectors_per_group * model.config.num_codevector_groups
        diversity = (n_codevectors - perplexity) / n_codevectors
        # transformers' loss (sums over masked frames) over the masked frames: the scale independent of batch size
        return distributed.global_mean(contrastive, masked.sum()) + model.config.diversity_loss_weight * diversity

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return self.backbone_encoder(self.backbone_encoder.collate(samples))


def _checkpoint_folder(path: Path) -> Path:
    if not (path / "config.json").exists():
        raise PipelineError(f"model.base_checkpoint {str(path)!r}: no Hugging Face wav2vec2 folder (config.json)")
    return path


def build_wav2vec2(cfg: DomainConfig, shards_dir: Path) -> Wav2Vec2Encoder:
    """The `wav2vec2` backbone to pretrain (with its pretraining heads): from `model.base_checkpoint`
    when one is set (continued pretraining), else a small model from scratch."""
    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    if cfg.model.base_checkpoint:
        model = Wav2Vec2ForPreTraining.from_pretrained(_checkpoint_folder(cfg.resolve(cfg.model.base_checkpoint)))
        model.config.pool_segments = cfg.model.pool_segments
        return Wav2Vec2Encoder(model, spec)
    return Wav2Vec2Encoder(Wav2Vec2ForPreTraining(small_config(cfg.model)), spec)


def load_wav2vec2_encoder(init: str, cfg: DomainConfig, pretrained_dir: Path, seed: int) -> Wav2Vec2Encoder:
    """ssl: the pretrained model; scratch: its architecture, random weights from `seed`;
    generic: the base checkpoint."""
    if init == "generic":
        model = Wav2Vec2Model.from_pretrained(_checkpoint_folder(cfg.resolve(str(cfg.model.base_checkpoint))))
        model.config.pool_segments = cfg.model.pool_segments
    elif init == "ssl":
        model = Wav2Vec2Model.from_pretrained(pretrained_dir)
    else:
        torch.manual_seed(seed)
        model = Wav2Vec2Model(Wav2Vec2Config.from_pretrained(pretrained_dir))
    return Wav2Vec2Encoder(model, InputSpec.from_config(cfg.ingest, cfg.preprocess))
