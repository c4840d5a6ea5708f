"""Each audio SSL method lowers its loss in a few steps; backbones save and load; options fail early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.audio.backbones import SpectrogramTransformer, load_spectrogram_encoder
from ssl_models.audio.config import AUDIO_METHODS, METHOD_INPUTS, AudioModelConfig
from ssl_models.audio.features import InputSpec, encode_row, model_input
from ssl_models.audio.wav2vec2 import build_wav2vec2

TINY = AudioModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def spoken_like_clips(n: int, rate: int = 16000, seconds: float = 1.0) -> list[np.ndarray]:
    """Harmonic tones with a moving pitch and an on/off envelope: structure to reconstruct."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    clips = []
    for _ in range(n):
        pitch = rng.uniform(100, 300) * (1 + 0.3 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        wave = sum(np.sin(k * phase) / k for k in (1, 2, 3))
        envelope = (np.sin(2 * np.pi * rng.uniform(1, 4) * t) > -0.2).astype(float)
        clips.append((0.3 * wave * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: extra threads only wait (see model.cpu_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_and_rows(name: str) -> tuple[torch.nn.Module, list[dict]]:
    kind = METHOD_INPUTS[name]
    spec = (InputSpec("waveform", 1, 8000, 16000, 400, 160) if kind == "waveform"
            else InputSpec("log_mel", 32, 100, 16000, 400, 160))
    clips = spoken_like_clips(8, seconds=0.5 if kind == "waveform" else 1.0)
    rows = [encode_row(model_input(clip, spec)) for clip in clips]
    if kind == "waveform":
        model = build_wav2vec2(TINY)
    else:
        frames = np.concatenate([model_input(clip, spec) for clip in clips])
        model = SpectrogramTransformer(32, 100, 32, 1, 2, 64, 2, 0, mean=frames.mean(0).tolist(),
                                       std=frames.std(0).tolist())
    return AUDIO_METHODS.get(name)(model, spec), rows


@pytest.mark.parametrize("name", AUDIO_METHODS.names())
def test_each_audio_method_lowers_its_loss_in_a_few_steps(name: str) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    method, rows = method_and_rows(name)
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(1)  # the same alterations and masks each step: the loss must fall on a fixed batch
        np.random.seed(1)
        loss = method(method.collate(rows))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert method.embed(rows[:3]).shape == (3, 32)


def test_a_saved_spectrogram_encoder_gives_the_same_features_and_scratch_differs(tmp_path: Path) -> None:
    method, rows = method_and_rows("tera")
    method.backbone.save(tmp_path / "encoder")
    spec = method.spec
    ssl = load_spectrogram_encoder("ssl", TINY, tmp_path / "encoder", 0, spec).eval()
    scratch = load_spectrogram_encoder("scratch", TINY, tmp_path / "encoder", 0, spec).eval()
    again = load_spectrogram_encoder("scratch", TINY, tmp_path / "encoder", 0, spec).eval()
    with torch.no_grad():
        expected = method.embed(rows[:4])
        batch = ssl.collate(rows[:4])
        torch.testing.assert_close(ssl(batch), expected)
        assert not torch.allclose(scratch(batch), expected)
        torch.testing.assert_close(scratch(batch), again(batch))  # scratch is a function of its seed
    # the training split's normalisation travels with the weights
    torch.testing.assert_close(ssl.backbone.mean, method.backbone.mean)
