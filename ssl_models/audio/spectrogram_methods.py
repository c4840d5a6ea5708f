"""Self-supervised methods on the spectrogram backbone: TERA and SSAST-style masked patches.

Each method's data side decodes the rows into log-mel clips padded to the clip length of the
spec and draws the clip's alterations or token masks from the clip's own seed, as tensors of
fixed shape; the forward pass only applies them to the normalised frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_models.audio.backbones import SpectrogramEncoder, SpectrogramTransformer, collate_spectrograms, frame_padding
from ssl_models.audio.config import MaskedSpectrogramOptions, TERAOptions
from ssl_models.audio.features import InputSpec
from ssl_models.core import distributed
from ssl_models.core.modules import DataSide, PretrainMethod, generator


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


@dataclass
class TERAAlterations(DataSide):
    """Log-mel clips and, per clip from its seed, TERA's alterations in compact form:
    `frame_source` [batch, frames] (the frame whose values fill each frame: itself, or another
    frame of the clip for a replaced block), `time_mask` [batch, frames] (the frames of the
    clip's altered blocks), `blocks_zeroed` [batch] (whether those blocks are set to zero),
    `band` [batch, mels] (the mel bins zeroed over the whole clip), `noisy` [batch] and `noise`
    [batch, frames, mels] (added; zero for most clips; float16, as the clips). `alteration_masks`
    expands them into the [batch, frames, mels] masks in the forward pass: a worker hands over
    ~5 KB of masks for the default's 32 clips of 100 frames x 64 mel bins instead of 410 KB."""

    spec: InputSpec
    options: TERAOptions

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate_spectrograms(list(rows), self.spec)
        n_frames, n_mels = self.spec.clip_steps, self.spec.width
        drawn = [self.draw(int(length), n_frames, n_mels, generator(seed))
                 for length, seed in zip(batch["lengths"].tolist(), seeds)]
        for index, name in enumerate(("frame_source", "time_mask", "blocks_zeroed", "band", "noisy", "noise")):
            batch[name] = torch.stack([clip[index] for clip in drawn])
        return batch

    def draw(self, length: int, n_frames: int, n_mels: int, rng: torch.Generator) -> tuple[torch.Tensor, ...]:
        o = self.options
        valid = torch.arange(n_frames) < length
        n_blocks = max(1, round(o.time_fraction * length / o.time_block))
        starts = torch.randint(0, max(1, length - o.time_block + 1), (n_blocks,), generator=rng)
        frames = torch.zeros(n_frames, dtype=torch.bool)
        for start in starts.tolist():
            frames[start:start + o.time_block] = True
        frames &= valid
        source = torch.arange(n_frames)
        choice = float(torch.rand((), generator=rng))
        # 80% of clips: the blocks zeroed; 10% replaced by frames from elsewhere; 10% kept
        if 0.8 <= choice < 0.9:
            source = torch.where(frames, torch.randint(0, max(1, length), (n_frames,), generator=rng), source)
        band = torch.zeros(n_mels, dtype=torch.bool)
        width = int(torch.randint(0, o.max_freq_band + 1, (), generator=rng))
        if width:
            low = int(torch.randint(0, n_mels - width + 1, (), generator=rng))
            band[low:low + width] = True
        noise = torch.zeros(n_frames, n_mels)
        noisy = float(torch.rand((), generator=rng)) < o.noise_probability
        if noisy:
            noise = o.noise_std * torch.randn(n_frames, n_mels, generator=rng)
        return (source, frames, torch.tensor(choice < 0.8), band, torch.tensor(noisy),
                (noise * valid[:, None]).half())


def alteration_masks(batch: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`zeroed` (set to zero: the zeroed blocks' frames, and the band over every frame) and
    `altered` (counted in the loss: the blocks' frames, the band within the clip, and every frame
    of the clip where noise is added), both [batch, frames, mels], from TERA's compact alterations
    and the clips' `valid` frames [batch, frames]."""
    time_mask, band = batch["time_mask"], batch["band"]
    zeroed = (time_mask & batch["blocks_zeroed"][:, None])[:, :, None] | band[:, None, :]
    altered = ((time_mask | (valid & batch["noisy"][:, None]))[:, :, None]
               | (band[:, None, :] & valid[:, :, None]))
    return zeroed, altered


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


@dataclass
class TokenMasks(DataSide):
    """Log-mel clips and, per clip from its seed, the patch tokens SSAST masks: `masked_tokens`
    [batch, tokens] and the same as indices, `masked_index` [batch, max_masked] with
    `masked_valid` (False where a short clip masks fewer tokens than the longest possible)."""

    spec: InputSpec
    options: MaskedSpectrogramOptions
    time_patches: int
    mel_patches: int
    patch_frames: int

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate_spectrograms(list(rows), self.spec)
        n_tokens = self.time_patches * self.mel_patches
        most = self.n_masked(n_tokens)
        masked_tokens = torch.zeros(len(rows), n_tokens, dtype=torch.bool)
        masked_index = torch.zeros(len(rows), most, dtype=torch.long)
        masked_valid = torch.zeros(len(rows), most, dtype=torch.bool)
        for row, (length, seed) in enumerate(zip(batch["lengths"].tolist(), seeds)):
            # the clip's real tokens come first (time-major): those starting before its end
            real = min(n_tokens, -(-int(length) // self.patch_frames) * self.mel_patches)
            chosen = torch.randperm(real, generator=generator(seed))[: self.n_masked(real)]
            masked_tokens[row, chosen] = True
            masked_index[row, : len(chosen)] = chosen
            masked_valid[row, : len(chosen)] = True
        return {**batch, "masked_tokens": masked_tokens, "masked_index": masked_index, "masked_valid": masked_valid}

    def n_masked(self, real_tokens: int) -> int:
        return min(real_tokens, max(2, int(self.options.mask_fraction * real_tokens)))


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
