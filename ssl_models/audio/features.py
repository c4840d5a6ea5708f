"""Model inputs of the audio domain: log-mel frames or waveforms, crops, and the shards.

Inputs are stored as float16 bytes (one binary cell per row), compact in Arrow and cheap to
load. Spectrogram normalisation statistics (mean and std per mel bin) come from the training
split's pretraining rows only and travel inside the backbone, so a saved encoder needs no
other file to be applied to new audio.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_models.audio.config import AudioIngestConfig, AudioPreprocessConfig

STORAGE_DTYPE = np.float16
INPUT_FILE = "audio_input.json"  # beside shards and saved encoders: how audio becomes the model's input


@dataclass(frozen=True)
class InputSpec:
    """What one stored row holds: `kind` (log_mel | waveform), per-step width, clip length in steps."""

    kind: str
    width: int  # mel bins per frame, 1 for a waveform
    clip_steps: int  # frames (log_mel) or samples (waveform) per clip
    sample_rate: int
    n_fft: int
    hop_length: int

    @classmethod
    def from_config(cls, ingest: AudioIngestConfig, preprocess: AudioPreprocessConfig) -> InputSpec:
        if preprocess.input == "waveform":
            return cls("waveform", 1, int(round(preprocess.clip_seconds * ingest.sample_rate)),
                       ingest.sample_rate, preprocess.n_fft, preprocess.hop_length)
        frames = int(round(preprocess.clip_seconds * ingest.sample_rate / preprocess.hop_length))
        return cls("log_mel", preprocess.n_mels, frames, ingest.sample_rate, preprocess.n_fft, preprocess.hop_length)

    def save(self, folder: Path) -> None:
        (folder / INPUT_FILE).write_text(json.dumps(asdict(self), indent=1))


def model_input(samples: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[steps, width] float32: log-mel frames (natural log of mel power) or the waveform."""
    if spec.kind == "waveform":
        return samples.reshape(-1, 1)
    import librosa

    power = np.abs(librosa.stft(samples, n_fft=spec.n_fft, hop_length=spec.hop_length)) ** 2
    mel = _mel_basis(spec.sample_rate, spec.n_fft, spec.width) @ power
    return np.log(mel + 1e-6).T.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)


def crops(steps: np.ndarray, clip_steps: int) -> list[np.ndarray]:
    """Pretraining crops: consecutive windows of `clip_steps`; a clip shorter than one window is
    one (padded later) row; a long clip's last partial window is kept when at least half full."""
    if len(steps) <= clip_steps:
        return [steps]
    windows = [steps[start:start + clip_steps] for start in range(0, len(steps), clip_steps)]
    return [w for w in windows if len(w) >= clip_steps // 2]


def centre_crop(steps: np.ndarray, clip_steps: int) -> np.ndarray:
    """A labeled clip cut to its middle `clip_steps` (keywords sit mid-clip more often than not)."""
    if len(steps) <= clip_steps:
        return steps
    start = (len(steps) - clip_steps) // 2
    return steps[start:start + clip_steps]


def encode_row(steps: np.ndarray) -> dict[str, Any]:
    return {"input": steps.astype(STORAGE_DTYPE).tobytes(), "length": int(len(steps))}


def stored_steps(row: dict[str, Any], width: int) -> np.ndarray:
    """A row's steps as stored ([steps, width], STORAGE_DTYPE, no copy)."""
    return np.frombuffer(row["input"], dtype=STORAGE_DTYPE).reshape(-1, width)


def decode_row(row: dict[str, Any], width: int) -> np.ndarray:
    return stored_steps(row, width).astype(np.float32)


class RunningMoments:
    """Per-column mean and std over many arrays without holding them (float64 sums)."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.total = np.zeros(width)
        self.total_squares = np.zeros(width)

    def add(self, steps: np.ndarray) -> None:
        self.add_sums(len(steps), steps.sum(axis=0, dtype=np.float64), np.square(steps, dtype=np.float64).sum(axis=0))

    def add_sums(self, count: int, total: np.ndarray, total_squares: np.ndarray) -> None:
        """An array's count and column sums, taken where it was made (`audio_chunk`)."""
        self.count += count
        self.total += total
        self.total_squares += total_squares

    def result(self) -> tuple[list[float], list[float]]:
        if self.count == 0:
            return [0.0] * len(self.total), [1.0] * len(self.total)
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_squares / self.count - mean ** 2, 1e-8))
        return mean.tolist(), std.tolist()


def pad_batch(arrays: list[np.ndarray], clip_steps: int,
              dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Stack to [batch, clip_steps, width] of `dtype` with zeros after each array's end; returns (batch, lengths)."""
    width = arrays[0].shape[1]
    batch = np.zeros((len(arrays), clip_steps, width), dtype=dtype)
    lengths = np.zeros(len(arrays), dtype=np.int64)
    for index, array in enumerate(arrays):
        array = array[:clip_steps]
        batch[index, :len(array)] = array
        lengths[index] = len(array)
    return batch, lengths
