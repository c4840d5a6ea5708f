"""Each audio SSL method lowers its loss in a few steps; encoders save and load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.audio import Audio
from ssl_models.audio.config import BACKBONE_INPUTS, METHOD_INPUTS, METHODS
from ssl_models.audio.features import INPUT_FILE, InputSpec, encode_row, model_input
from ssl_models.core.config import DomainConfig, load_config
from ssl_models.core.modules import PretrainMethod, sample_seeds
from tests.conftest import losses_on_one_batch, write_params

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
PREPROCESS = {"log_mel": {"input": "log_mel", "n_mels": 32, "n_fft": 400, "hop_length": 160, "clip_seconds": 1.0},
              "waveform": {"input": "waveform", "clip_seconds": 0.5}}


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
    """Tiny models on a shared 2-core machine: extra threads only wait (see cpu_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_config(root: Path, name: str) -> DomainConfig:
    kind = METHOD_INPUTS[name]
    backbone = next(b for b, reads in BACKBONE_INPUTS.items() if reads == kind)
    block = {"module": "audio", "corpus": "corpus", "ingest": {"sample_rate": 16000},
             "preprocess": PREPROCESS[kind], "model": {**TINY_MODEL, "backbone": backbone},
             "pretrain": {"method": name}}
    write_params(root, {"domains": {"audio": block}})
    return load_config("audio", root / "params.yaml")[0]


def method_and_rows(root: Path, name: str, lengths: list[float] | None = None,
                    ) -> tuple[PretrainMethod, list[dict], DomainConfig]:
    """The method as the pretrain stage builds it (normalisation statistics of the clips in the
    shards folder) and pretraining rows of 8 clips (or clips of the given lengths in seconds)."""
    cfg = method_config(root, name)
    spec = InputSpec.from_config(cfg.ingest, cfg.preprocess)
    seconds = cfg.preprocess.clip_seconds
    clips = spoken_like_clips(8, seconds=seconds)
    if lengths is not None:
        clips = [clips[i % 8][: int(16000 * s)] for i, s in enumerate(lengths)]
    inputs = [model_input(clip, spec) for clip in clips]
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    frames = np.concatenate(inputs)
    (shards / "normalisation.json").write_text(json.dumps({"mean": frames.mean(0).tolist(),
                                                            "std": frames.std(0).tolist()}))
    torch.manual_seed(0)
    return Audio().build_pretrain_method(cfg, shards), [encode_row(x) for x in inputs], cfg


@pytest.mark.parametrize("name", METHODS.names())
def test_each_audio_method_lowers_its_loss_in_a_few_steps(tmp_path: Path, name: str) -> None:
    method, rows, _ = method_and_rows(tmp_path, name)
    batch = method.data_side()(rows, sample_seeds(0, 0, range(len(rows))))  # one fixed batch: the loss must fall
    losses = losses_on_one_batch(method, batch, steps=20, learning_rate=3e-3)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert method.embed(rows[:3]).shape == (3, 32)


@pytest.mark.parametrize("name", ["tera", "wav2vec2"])
def test_a_saved_encoder_gives_the_same_features_and_scratch_differs(tmp_path: Path, name: str) -> None:
    method, rows, cfg = method_and_rows(tmp_path, name)
    encoder = method.encoder()
    assert {id(p) for p in encoder.parameters()} <= {id(p) for p in method.parameters()}  # the same modules
    encoder.save(tmp_path / "encoder")
    assert json.loads((tmp_path / "encoder" / INPUT_FILE).read_text())["kind"] == METHOD_INPUTS[name]
    ssl, scratch, again = (Audio().load_encoder(init, cfg, tmp_path / "shards", tmp_path / "encoder", 5).eval()
                           for init in ("ssl", "scratch", "scratch"))
    method.eval()
    with torch.no_grad():
        expected = method.embed(rows[:4])
        batch = ssl.collate(rows[:4])
        torch.testing.assert_close(ssl(batch), expected)
        assert not torch.allclose(scratch(batch), expected)
        torch.testing.assert_close(scratch(batch), again(batch))  # scratch is a function of its seed
    if name == "tera":  # the training split's normalisation travels with the weights
        torch.testing.assert_close(ssl.backbone.mean, method.backbone.mean)
