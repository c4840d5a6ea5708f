"""Self-supervised methods on the spectrogram backbone: TERA and SSAST-style masked patches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_models.audio.backbones import SpectrogramTransformer, collate_spectrograms, frame_padding
from ssl_models.audio.config import AUDIO_METHODS
from ssl_models.audio.features import InputSpec
from ssl_models.core.modules import PretrainMethod


class SpectrogramMethod(PretrainMethod):
    """Shared plumbing: batches of log-mel crops, pooled embeddings for RankMe."""

    def __init__(self, backbone: SpectrogramTransformer, spec: InputSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_spectrograms(samples, self.spec)

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        batch = self.collate(samples)
        hidden, padding = self.backbone(self.backbone.normalise(batch["log_mel"], batch["lengths"]), batch["lengths"])
        return self.backbone.pool(hidden, padding)

    def clean_frames(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised frames, zero past each clip's end."""
        return self.backbone.normalise(batch["log_mel"], batch["lengths"])

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, patch_dim] -> [batch, frames, mels], the inverse of `patchify`."""
        b = self.backbone
        shaped = patches.reshape(patches.shape[0], b.time_patches, b.mel_patches, b.patch_frames, b.patch_mels)
        return shaped.permute(0, 1, 3, 2, 4).reshape(patches.shape[0], b.time_patches * b.patch_frames, -1)


@AUDIO_METHODS.register("tera")
class TERA(SpectrogramMethod):
    """TERA: Liu, Li and Lee, "TERA: Self-Supervised Learning of Transformer Encoder Representation
    for Speech", IEEE/ACM TASLP 2021. The input frames are altered along time (blocks of
    consecutive frames: 80% zeroed, 10% replaced by other frames, 10% kept), frequency (a band of
    mel bins zeroed over the whole clip) and magnitude (Gaussian noise added); the model
    reconstructs the clean frames, with an L1 loss on the altered positions.

    Usage: `loss = method(method.collate(rows))`. Alterations draw from torch's global RNG.
    """

    def __init__(self, backbone: SpectrogramTransformer, spec: InputSpec, time_fraction: float = 0.15,
                 time_block: int = 7, max_freq_band: int = 8, noise_probability: float = 0.1,
                 noise_std: float = 0.2) -> None:
        super().__init__(backbone, spec)
        self.time_fraction, self.time_block = time_fraction, time_block
        self.max_freq_band, self.noise_probability, self.noise_std = max_freq_band, noise_probability, noise_std
        self.reconstruction = nn.Sequential(nn.Linear(backbone.hidden_size, backbone.hidden_size), nn.GELU(),
                                            nn.Linear(backbone.hidden_size, backbone.patch_dim))

    def alter(self, clean: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Altered frames and a [batch, frames, mels] mask of the altered positions."""
        batch, n_frames, n_mels = clean.shape
        valid = ~frame_padding(lengths, n_frames)
        altered, positions = clean.clone(), torch.zeros_like(clean, dtype=torch.bool)
        for index in range(batch):
            length = int(lengths[index])
            n_blocks = max(1, round(self.time_fraction * length / self.time_block))
            starts = torch.randint(0, max(1, length - self.time_block + 1), (n_blocks,))
            frames = torch.zeros(n_frames, dtype=torch.bool, device=clean.device)
            for start in starts.tolist():
                frames[start:start + self.time_block] = True
            frames &= valid[index]
            choice = torch.rand(())
            if choice < 0.8:
                altered[index, frames] = 0.0
            elif choice < 0.9:  # replaced by frames from elsewhere in the clip
                source = torch.randint(0, max(1, length), (int(frames.sum()),)).to(clean.device)
                altered[index, frames] = clean[index, source]
            positions[index, frames] = True
            width = int(torch.randint(0, self.max_freq_band + 1, ()))
            if width:
                low = int(torch.randint(0, n_mels - width + 1, ()))
                altered[index, :, low:low + width] = 0.0
                positions[index, :length, low:low + width] = True
        noisy = (torch.rand(batch) < self.noise_probability).to(clean.device)  # drawn on the CPU generator
        if noisy.any():
            altered[noisy] += self.noise_std * torch.randn_like(altered[noisy])
            positions[noisy] |= valid[noisy].unsqueeze(-1)
        return altered * valid.unsqueeze(-1), positions

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = self.clean_frames(batch)
        altered, positions = self.alter(clean, batch["lengths"])
        hidden, _ = self.backbone(altered, batch["lengths"])
        predicted = self.unpatchify(self.reconstruction(hidden))[:, : clean.shape[1]]
        return (predicted - clean).abs()[positions].mean()


@AUDIO_METHODS.register("masked_spectrogram")
class MaskedSpectrogramModeling(SpectrogramMethod):
    """SSAST: Gong, Lai, Chung and Glass, "SSAST: Self-Supervised Audio Spectrogram Transformer",
    AAAI 2022. A share of the patch tokens is replaced by a learned mask embedding; for each
    masked token the model both picks its own patch among the clip's masked patches (InfoNCE,
    discriminative) and reconstructs it (MSE, generative, weighted by `generative_weight`: 10
    in the paper).

    Usage: `loss = method(method.collate(rows))`. Masks draw from torch's global RNG.
    """

    def __init__(self, backbone: SpectrogramTransformer, spec: InputSpec, mask_fraction: float = 0.4,
                 generative_weight: float = 10.0) -> None:
        super().__init__(backbone, spec)
        self.mask_fraction, self.generative_weight = mask_fraction, generative_weight
        self.mask_embedding = nn.Parameter(torch.zeros(backbone.hidden_size))
        self.discriminative = nn.Sequential(nn.Linear(backbone.hidden_size, backbone.hidden_size), nn.GELU(),
                                            nn.Linear(backbone.hidden_size, backbone.patch_dim))
        self.generative = nn.Sequential(nn.Linear(backbone.hidden_size, backbone.hidden_size), nn.GELU(),
                                        nn.Linear(backbone.hidden_size, backbone.patch_dim))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = self.backbone
        patches = b.patchify(self.clean_frames(batch))
        padding = b.token_padding(batch["lengths"])
        valid_tokens = int((~padding).sum(1).min())
        n_masked = max(2, int(self.mask_fraction * valid_tokens))
        # the same count of masked tokens in every clip, drawn among its real (unpadded) tokens
        scores = torch.rand(padding.shape).to(padding.device).masked_fill(padding, 2.0)
        masked = scores.argsort(dim=1)[:, :n_masked]
        tokens = b.patch_embedding(patches)
        mask_positions = torch.zeros_like(padding).scatter(1, masked, True)
        tokens = torch.where(mask_positions.unsqueeze(-1), self.mask_embedding.expand_as(tokens), tokens)
        hidden = b.encode_tokens(tokens, padding)
        gather = masked.unsqueeze(-1)
        hidden_masked = hidden.gather(1, gather.expand(-1, -1, hidden.shape[-1]))
        target = patches.gather(1, gather.expand(-1, -1, patches.shape[-1]))
        logits = self.discriminative(hidden_masked) @ target.transpose(1, 2)  # [batch, masked, masked]
        labels = torch.arange(n_masked, device=logits.device).expand(logits.shape[0], -1)
        nce = nn.functional.cross_entropy(logits.reshape(-1, n_masked), labels.reshape(-1))
        mse = nn.functional.mse_loss(self.generative(hidden_masked), target)
        return nce + self.generative_weight * mse
