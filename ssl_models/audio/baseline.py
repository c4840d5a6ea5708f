"""The first audio classifier a practitioner tries: summary statistics of MFCC and log-mel
frames per clip (the `baseline` init; the fine-tune stage fits the logistic regression).

Rows hold log-mel frames or the waveform (`preprocess.input`); a waveform is turned into the
same log-mel frames the spectrogram models read. MFCCs are the DCT-II of the log-mel frames
(Davis & Mermelstein 1980; librosa's `mfcc` does the same on dB-scaled mel power). Each clip
gives, per coefficient and per mel bin, the mean, standard deviation and 10th/50th/90th
percentiles over its frames, and for the MFCCs the mean and standard deviation of their
frame-to-frame change (deltas). Columns are standardised by the pool's mean and standard
deviation (fitted without labels, on the pool only), so no statistic outweighs another by its unit.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ssl_models.audio.features import STORAGE_DTYPE, InputSpec, decode_row, model_input
from ssl_models.core.config import DomainConfig
from ssl_models.core.errors import PipelineError
from ssl_models.core.features import standardise_by_pool

log = logging.getLogger("finetune")

N_MFCC = 20  # the classic speech front end keeps 13-20 cepstral coefficients
PERCENTILES = (10.0, 50.0, 90.0)


def log_mel_frames(row: dict[str, Any], stored: InputSpec, spectrogram: InputSpec) -> np.ndarray:
    """[frames, mel bins] natural-log mel power of one labeled row, whatever the row holds."""
    if len(row["input"]) % (stored.width * np.dtype(STORAGE_DTYPE).itemsize):
        raise PipelineError(f"a labeled clip's stored input does not hold {stored.kind} rows of width {stored.width} "
                            "(preprocess settings changed since the shards were written); re-run preprocess")
    steps = decode_row(row, stored.width)
    if stored.kind == "waveform":
        return model_input(steps[:, 0], spectrogram)
    return steps


def frame_statistics(frames: np.ndarray) -> np.ndarray:
    """Mean, std and percentiles over time of each column of [frames, width] -> [width * 5]."""
    if len(frames) == 0:
        return np.zeros(frames.shape[1] * (2 + len(PERCENTILES)), dtype=np.float64)
    percentiles = np.percentile(frames, PERCENTILES, axis=0)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0), *percentiles])


def clip_features(log_mel: np.ndarray) -> np.ndarray:
    """The summary statistics of one clip's MFCC, MFCC deltas and log-mel frames."""
    from scipy.fft import dct

    log_mel = log_mel.astype(np.float64)
    mfcc = dct(log_mel, type=2, axis=1, norm="ortho")[:, :min(N_MFCC, log_mel.shape[1])]
    deltas = np.diff(mfcc, axis=0) if len(mfcc) > 1 else np.zeros((1, mfcc.shape[1]))
    return np.concatenate([frame_statistics(mfcc), deltas.mean(axis=0), deltas.std(axis=0),
                           frame_statistics(log_mel)])


def features(cfg: DomainConfig, pool: list[dict[str, Any]], test: list[dict[str, Any]]) -> tuple[Any, Any]:
    """[rows, features] float32 of the pool and the test clips (MFCC and log-mel statistics)."""
    if not pool:
        raise PipelineError(f"domains.{cfg.name}: no labeled pool rows for the MFCC baseline; check the labels "
                            "CSV and the split settings")
    stored = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    spectrogram = InputSpec("log_mel", cfg.preprocess.n_mels, 0, stored.sample_rate, stored.n_fft, stored.hop_length)
    pool_features = np.stack([clip_features(log_mel_frames(row, stored, spectrogram)) for row in pool])
    test_features = np.stack([clip_features(log_mel_frames(row, stored, spectrogram)) for row in test]) if test \
        else np.zeros((0, pool_features.shape[1]))
    log.info("finetune %s: baseline of %d MFCC and log-mel statistics per clip", cfg.name, pool_features.shape[1])
    return standardise_by_pool(pool_features, test_features)
