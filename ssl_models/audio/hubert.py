"""HuBERT-style masked prediction of discrete targets, first iteration: Hsu, Bolte, Tsai, Lakhotia,
Salakhutdinov and Mohamed, "HuBERT: Self-Supervised Speech Representation Learning by Masked
Prediction of Hidden Units", IEEE/ACM TASLP 2021.

The targets are k-means clusters of hand-made features of each time step: 39-dimensional MFCCs
(13 coefficients with their first and second derivatives, the paper's first iteration) or the
log-mel frames themselves, computed from the stored log-mel frames by librosa in the data side.
On the spectrogram backbone a time step is a column of tokens (`patch_frames` frames: 20 ms at
the default, the paper's frame rate); its features are the mean of its frames'. Spans of time
steps are masked (the tokens replaced by a learned mask embedding, as wav2vec 2.0 and HuBERT
mask their convolutional features); the Transformer's output at each masked step (the mean
over its tokens along frequency) is projected and scored against one learned embedding per
cluster by cosine similarity over a temperature, the paper's logits; the loss is the
cross-entropy on the masked steps only (the paper's alpha = 1).

The codebook (scikit-learn's MiniBatchKMeans, seeded, single-threaded so that every process
computes the same bits) and the standardisation of the features it was fit on are buffers of the
method: a checkpoint holds them and a resumed run restores them exactly. They are fit once,
before the first update:

- `prepare(rows)`, on the frames of up to `kmeans_clips` training clips (a seeded choice), when the
  caller has the training rows (every process the same rows: the same codebook);
- otherwise at the first forward pass, on the first step's batch gathered from every process in
  rank order (the clips of the first accumulation round: the same clips for any number of
  processes), so every process fits the same codebook from the same rows.

Registered in config.py: `METHODS.register_lazy("hubert", ...:HuBERT, options=...:HuBERTOptions)`;
options named by module path, so validating another method's block imports no torch.

Usage: `method.prepare(train_rows)` (optional), then `loss = method(method.data_side()(rows, seeds))`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ssl_models.audio.backbones import SpectrogramEncoder, collate_spectrograms
from ssl_models.audio.features import InputSpec, decode_row
from ssl_models.audio.methods import SpectrogramMethod
from ssl_models.core import distributed
from ssl_models.core.config import require
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import DataSide, generator

log = logging.getLogger("pretrain")

N_MFCC = 13  # coefficients per frame before the derivatives (the paper's, and Kaldi's default)


@dataclass
class HuBERTOptions:
    """`pretrain.options` of hubert: the targets' features and codebook, and the masking."""

    num_clusters: int = 100  # k-means clusters: the targets' classes (100 on MFCCs in the paper)
    features: Literal["mfcc", "log_mel"] = "mfcc"  # what is clustered: MFCC + deltas (39 dims) or log-mel frames
    mask_probability: float = 0.08  # chance of a time step starting a masked span (p = 8% in the paper)
    mask_length: int = 20  # frames per masked span: 200 ms at a 10 ms hop (the paper's 10 steps of 20 ms)
    temperature: float = 0.1  # of the cosine-similarity logits (0.1 in the paper)
    kmeans_clips: int = 2000  # `prepare`: the codebook is fit on the frames of at most this many training clips

    def validate(self, where: str) -> None:
        require(self.num_clusters >= 2, f"{where}.num_clusters", "must be at least 2")
        require(0 < self.mask_probability <= 1, f"{where}.mask_probability", "must be in (0, 1]")
        require(self.mask_length >= 1, f"{where}.mask_length", "must be at least 1 frame")
        require(self.temperature > 0, f"{where}.temperature", "must be positive")
        require(self.kmeans_clips >= 1, f"{where}.kmeans_clips", "must be at least 1 clip")


def feature_size(kind: str, n_mels: int) -> int:
    """Features per time step: 3 x min(13, n_mels) MFCC values with their deltas, or n_mels log-mel bins."""
    return 3 * min(N_MFCC, n_mels) if kind == "mfcc" else n_mels


def frame_features(log_mel: np.ndarray, kind: str) -> np.ndarray:
    """[frames, features] of one clip's real log-mel frames [frames, n_mels] (natural log of mel power)."""
    if kind == "log_mel":
        return log_mel.astype(np.float32)
    import librosa

    decibels = log_mel.T.astype(np.float64) * (10.0 / np.log(10.0))  # ln(power) -> 10 log10(power)
    mfcc = librosa.feature.mfcc(S=decibels, n_mfcc=min(N_MFCC, log_mel.shape[1]))
    # "nearest" pads the edges, so a clip shorter than the derivative's 9-frame window still has deltas
    deltas = [librosa.feature.delta(mfcc, order=order, mode="nearest") for order in (1, 2)]
    return np.concatenate([mfcc, *deltas]).T.astype(np.float32)


def step_features(log_mel: np.ndarray, kind: str, patch_frames: int) -> np.ndarray:
    """[time steps, features]: the mean features of each step's `patch_frames` frames (the last
    step: of its real frames), for one clip's real frames."""
    features = frame_features(log_mel, kind)
    n_steps = -(-len(features) // patch_frames)
    padded = np.zeros((n_steps * patch_frames, features.shape[1]), dtype=np.float64)
    padded[: len(features)] = features
    counts = np.minimum(patch_frames, len(features) - np.arange(n_steps) * patch_frames)
    return (padded.reshape(n_steps, patch_frames, -1).sum(1) / counts[:, None]).astype(np.float32)


def fit_codebook(features: np.ndarray, num_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres [clusters, features], mean, std) of MiniBatchKMeans on `features` [rows, features]
    standardised per column; single-threaded, so the same rows and seed give the same bits anywhere."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    if len(features) < num_clusters:
        raise PipelineError(f"pretrain.options.num_clusters {num_clusters} exceeds the {len(features)} time steps "
                            "the hubert codebook is fit on; lower num_clusters or raise pretrain.batch_size")
    features = features.astype(np.float64)
    mean, std = features.mean(0), np.maximum(features.std(0), 1e-8)
    # fairseq's HuBERT k-means settings (examples/hubert/simple_kmeans), fewer restarts for a CPU
    kmeans = MiniBatchKMeans(n_clusters=num_clusters, init="k-means++", max_iter=100, batch_size=10000,
                             tol=0.0, max_no_improvement=100, n_init=3, reassignment_ratio=0.0, random_state=seed)
    with threadpool_limits(1):
        kmeans.fit((features - mean) / std)
    return kmeans.cluster_centers_, mean, std


@dataclass
class HuBERTMasks(DataSide):
    """Log-mel clips and, per clip: `target_features` [batch, steps, features] (the clustered
    features of each time step, zero past its end) and, from its seed, `masked_steps` [batch, steps]
    (spans of the clip's real time steps)."""

    spec: InputSpec
    options: HuBERTOptions
    time_patches: int
    patch_frames: int

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate_spectrograms(list(rows), self.spec)
        size = feature_size(self.options.features, self.spec.width)
        features = np.zeros((len(rows), self.time_patches, size), dtype=np.float32)
        masked = torch.zeros(len(rows), self.time_patches, dtype=torch.bool)
        for index, (row, length, seed) in enumerate(zip(rows, batch["lengths"].tolist(), seeds)):
            if length == 0:
                continue
            steps = step_features(decode_row(row, self.spec.width)[:length], self.options.features,
                                  self.patch_frames)
            features[index, : len(steps)] = steps
            masked[index] = self.draw(len(steps), generator(seed))
        return {**batch, "target_features": torch.from_numpy(features), "masked_steps": masked}

    def draw(self, real_steps: int, rng: torch.Generator) -> torch.Tensor:
        """Spans of `mask_length` frames (whole time steps) starting at round(p x steps) random
        real steps, as TERA's blocks; overlapping spans merge, as in wav2vec 2.0 and HuBERT."""
        span = min(real_steps, max(1, round(self.options.mask_length / self.patch_frames)))
        n_spans = max(1, round(self.options.mask_probability * real_steps))
        masked = torch.zeros(self.time_patches, dtype=torch.bool)
        for start in torch.randint(0, real_steps - span + 1, (n_spans,), generator=rng).tolist():
            masked[start:start + span] = True
        return masked


class HuBERT(SpectrogramMethod):
    """HuBERT's masked prediction of k-means targets on the spectrogram backbone (see the module's
    docstring). Keeps the `last` checkpoint rule, as the other masked-prediction methods: RankMe is
    validated on joint-embedding methods only."""

    def __init__(self, encoder: SpectrogramEncoder, options: HuBERTOptions) -> None:
        super().__init__(encoder, options)
        hidden = self.backbone.hidden_size
        size = feature_size(options.features, self.backbone.config["n_mels"])
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.projection = nn.Linear(hidden, hidden)  # the paper's projection A
        self.code_embeddings = nn.Parameter(torch.randn(options.num_clusters, hidden) * 0.02)  # its e_c
        # the codebook and its features' standardisation, float64 as scikit-learn fits them; uint8
        # flag (gloo broadcasts no bool buffers under DDP)
        self.register_buffer("codebook", torch.zeros(options.num_clusters, size, dtype=torch.float64))
        self.register_buffer("feature_mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("feature_std", torch.ones(size, dtype=torch.float64))
        self.register_buffer("codebook_fitted", torch.zeros((), dtype=torch.uint8))
        # k-means' seed, drawn from the generator pretrain.seed set: the same in every process
        self.register_buffer("kmeans_seed", torch.randint(0, 2**31 - 1, ()))
        # whether `codebook_fitted` was seen set: read once, not every step (a host sync on a GPU);
        # forgotten whenever a state is loaded
        self._codebook_ready = False
        self.register_load_state_dict_post_hook(HuBERT._forget_codebook_ready)

    @staticmethod
    def _forget_codebook_ready(module: nn.Module, incompatible_keys: Any) -> None:
        module._codebook_ready = False

    def data_side(self) -> HuBERTMasks:
        return HuBERTMasks(self.backbone_encoder.spec, self.options, self.backbone.time_patches,
                           self.backbone.patch_frames)

    @torch.no_grad()
    def prepare(self, rows: Sequence[dict[str, Any]]) -> None:
        """Fit the codebook on the time steps of up to `kmeans_clips` of the training `rows` (a choice
        seeded by `kmeans_seed`); every process given the same rows fits the same codebook."""
        data_side, seed = self.data_side(), int(self.kmeans_seed)
        chosen = np.arange(len(rows))
        if len(rows) > self.options.kmeans_clips:
            chosen = np.sort(np.random.default_rng(seed).choice(len(rows), self.options.kmeans_clips, replace=False))
        width, clip_frames = data_side.spec.width, data_side.spec.clip_steps
        features = [step_features(decode_row(row, width)[:clip_frames], self.options.features, data_side.patch_frames)
                    for row in (rows[int(i)] for i in chosen) if int(row["length"]) > 0]
        self._set_codebook(np.concatenate(features) if features else np.zeros((0, self.codebook.shape[1])), seed)
        log.info("hubert: codebook of %d clusters fit on the %s of %d training clip(s)", self.options.num_clusters,
                 self.options.features, len(features))

    @torch.no_grad()
    def _fit_on_batch(self, features: torch.Tensor, real: torch.Tensor) -> None:
        """The codebook of the real time steps of every process' clips of this batch, in rank order."""
        every = distributed.gather(features.float().contiguous())
        every_real = distributed.gather(real.to(torch.uint8).contiguous()).bool()
        self._set_codebook(every[every_real].double().cpu().numpy(), int(self.kmeans_seed))
        log.info("hubert: codebook of %d clusters fit on the %s of the first batch's %d time steps",
                 self.options.num_clusters, self.options.features, int(every_real.sum()))

    def _set_codebook(self, features: np.ndarray, seed: int) -> None:
        centres, mean, std = fit_codebook(features, self.options.num_clusters, seed)
        for buffer, value in ((self.codebook, centres), (self.feature_mean, mean), (self.feature_std, std)):
            buffer.copy_(torch.from_numpy(value))
        self.codebook_fitted.fill_(1)
        self._codebook_ready = True

    def targets(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, steps] the nearest centre of each time step's standardised features, in float64:
        a clip's targets do not depend on the batch it is computed in (no near-tie flips)."""
        with torch.autocast(features.device.type, enabled=False):
            standard = (features.double() - self.feature_mean) / self.feature_std
            distances = (self.codebook.square().sum(-1) - 2 * standard @ self.codebook.T)  # + |x|^2, same per row
            return distances.argmin(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = self.backbone
        patches = b.patchify(self.clean_frames(batch))
        padding = b.token_padding(batch["lengths"])
        masked_steps = batch["masked_steps"]
        tokens = b.patch_embedding(patches)
        masked_tokens = masked_steps.repeat_interleave(b.mel_patches, dim=1).unsqueeze(-1)
        tokens = torch.where(masked_tokens, self.mask_embedding.expand_as(tokens), tokens)
        hidden = b.encode_tokens(tokens, padding)
        n_clips, n_steps = masked_steps.shape
        hidden = hidden.view(n_clips, n_steps, b.mel_patches, -1).mean(2)  # one vector per time step
        real = ~padding.view(n_clips, n_steps, b.mel_patches)[:, :, 0]
        if not self._codebook_ready:
            self._codebook_ready = bool(self.codebook_fitted)
        if not self._codebook_ready:  # no `prepare` before the first step, nor a checkpoint's codebook
            self._fit_on_batch(batch["target_features"], real)
        counted = masked_steps & real
        targets = self.targets(batch["target_features"])[counted]
        predicted = nn.functional.normalize(self.projection(hidden[counted]).float(), dim=-1)
        codes = nn.functional.normalize(self.code_embeddings.float(), dim=-1)
        logits = predicted @ codes.T / self.options.temperature
        # the mean over the masked steps of every process' clips (their number varies by clip)
        return distributed.global_mean(nn.functional.cross_entropy(logits, targets, reduction="sum"), counted.sum())
