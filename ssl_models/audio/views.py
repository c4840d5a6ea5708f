"""The data sides of the audio methods: picklable callables that loader workers run, turning
raw pretraining rows into model input and each clip's alterations or masks, every draw from the
clip's own seed.

The spectrogram methods' data sides decode the rows into log-mel clips padded to the clip length
of the spec and draw the clip's alterations or token masks as tensors of fixed shape; the
forward pass only applies them to the normalised frames. wav2vec2's runs transformers' own
span-mask and negative samplers per clip and draws the quantiser's Gumbel noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssl_models.audio.backbones import collate_spectrograms, collate_waveforms
from ssl_models.audio.config import MaskedSpectrogramOptions, TERAOptions, Wav2Vec2Options, conv_frames
from ssl_models.audio.features import InputSpec
from ssl_models.core.modules import DataSide, generator


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
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

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
