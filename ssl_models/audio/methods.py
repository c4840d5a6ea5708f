"""Self-supervised methods for audio, each a `PretrainMethod(encoder, options)` with
`forward(batch) -> loss`; their inputs, alterations and masks are built by the data sides in
`views.py`.

- `tera`: reconstruction of altered log-mel frames (TERA), on the spectrogram backbone.
- `masked_spectrogram`: SSAST's masked patch modelling, on the spectrogram backbone.
- `wav2vec2`: wav2vec 2.0's contrastive task on raw waveforms, on the wav2vec2 backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_models.audio.backbones import (SpectrogramEncoder, SpectrogramTransformer, Wav2Vec2Encoder, frame_padding,
                                        quiet_transformers)
from ssl_models.audio.config import MaskedSpectrogramOptions, TERAOptions, Wav2Vec2Options
from ssl_models.audio.views import SpanMasks, TERAAlterations, TokenMasks, alteration_masks
from ssl_models.core import distributed
from ssl_models.core.modules import PretrainMethod


class SpectrogramMethod(PretrainMethod):
    """Shared plumbing: the backbone of the encoder, pooled embeddings for RankMe."""

    backbone_encoder: SpectrogramEncoder

    @property
    def backbone(self) -> SpectrogramTransformer:
        return self.backbone_encoder.backbone

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        return self.backbone_encoder(self.backbone_encoder.collate(samples))

    def clean_frames(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised frames, zero past each clip's end."""
        return self.backbone.normalise(batch["log_mel"], batch["lengths"])

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, patch_dim] -> [batch, frames, mels], the inverse of `patchify`."""
        b = self.backbone
        shaped = patches.reshape(patches.shape[0], b.time_patches, b.mel_patches, b.patch_frames, b.patch_mels)
        return shaped.permute(0, 1, 3, 2, 4).reshape(patches.shape[0], b.time_patches * b.patch_frames, -1)


class TERA(SpectrogramMethod):
    """TERA: Liu, Li and Lee, "TERA: Self-Supervised Learning of Transformer Encoder Representation
    for Speech", IEEE/ACM TASLP 2021. The input frames are altered along time (blocks of
    consecutive frames: 80% zeroed, 10% replaced by other frames, 10% kept), frequency (a band of
    mel bins zeroed over the whole clip) and magnitude (Gaussian noise added); the model
    reconstructs the clean frames, with an L1 loss on the altered positions.

    Usage: `loss = method(method.data_side()(rows, seeds))`.
    """

    def __init__(self, encoder: SpectrogramEncoder, options: TERAOptions) -> None:
        super().__init__(encoder, options)
        hidden, patch_dim = self.backbone.hidden_size, self.backbone.patch_dim
        self.reconstruction = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, patch_dim))

    def data_side(self) -> TERAAlterations:
        return TERAAlterations(self.backbone_encoder.spec, self.options)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = self.clean_frames(batch)
        valid = ~frame_padding(batch["lengths"], clean.shape[1])
        zeroed, counted = alteration_masks(batch, valid)
        altered = clean.gather(1, batch["frame_source"].unsqueeze(-1).expand_as(clean))
        altered = (altered.masked_fill(zeroed, 0.0) + batch["noise"]) * valid.unsqueeze(-1)
        hidden, _ = self.backbone(altered, batch["lengths"])
        predicted = self.unpatchify(self.reconstruction(hidden))[:, : clean.shape[1]]
        # the mean over the altered positions of every process' clips (their number varies by clip)
        return distributed.global_mean((predicted - clean).abs()[counted].sum(), counted.sum())


class MaskedSpectrogramModeling(SpectrogramMethod):
    """SSAST: Gong, Lai, Chung and Glass, "SSAST: Self-Supervised Audio Spectrogram Transformer",
    AAAI 2022. A share of each clip's patch tokens is replaced by a learned mask embedding; for
    each masked token the model both picks its own patch among the clip's masked patches
    (InfoNCE, discriminative) and reconstructs it (MSE, generative, weighted by
    `generative_weight`: 10 in the paper).

    Usage: `loss = method(method.data_side()(rows, seeds))`.
    """

    def __init__(self, encoder: SpectrogramEncoder, options: MaskedSpectrogramOptions) -> None:
        super().__init__(encoder, options)
        hidden, patch_dim = self.backbone.hidden_size, self.backbone.patch_dim
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.discriminative = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, patch_dim))
        self.generative = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, patch_dim))

    def data_side(self) -> TokenMasks:
        b = self.backbone
        return TokenMasks(self.backbone_encoder.spec, self.options, b.time_patches, b.mel_patches, b.patch_frames)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = self.backbone
        patches = b.patchify(self.clean_frames(batch))
        padding = b.token_padding(batch["lengths"])
        tokens = b.patch_embedding(patches)
        tokens = torch.where(batch["masked_tokens"].unsqueeze(-1), self.mask_embedding.expand_as(tokens), tokens)
        hidden = b.encode_tokens(tokens, padding)
        gather = batch["masked_index"].unsqueeze(-1)
        hidden_masked = hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1]))
        target = patches.gather(1, gather.expand(-1, -1, patches.shape[-1]))
        valid = batch["masked_valid"]
        logits = self.discriminative(hidden_masked) @ target.transpose(1, 2)  # [batch, masked, masked]
        # a clip's own masked patches are its candidates; padding entries are none
        logits = logits.masked_fill(~valid.unsqueeze(1), torch.finfo(logits.dtype).min)
        labels = torch.arange(valid.shape[1], device=logits.device).expand_as(valid)
        # means over the masked tokens of every process' clips (a clip masks a share of its own tokens)
        masked = valid.sum()
        nce = distributed.global_mean(nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum"),
                                      masked)
        mse = distributed.global_mean((self.generative(hidden_masked) - target).square()[valid].sum(),
                                      masked * target.shape[-1])
        return nce + self.options.generative_weight * mse


class Wav2Vec2Contrastive(PretrainMethod):
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

    Usage: `loss = method(method.data_side()(rows, seeds))`; the encoder holds a
    `Wav2Vec2ForPreTraining` (the `wav2vec2` backbone builds one)."""

    backbone_encoder: Wav2Vec2Encoder

    def __init__(self, encoder: Wav2Vec2Encoder, options: Wav2Vec2Options) -> None:
        super().__init__(encoder, options)
        if not isinstance(encoder.model, quiet_transformers().Wav2Vec2ForPreTraining):
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
