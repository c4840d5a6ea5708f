"""HuBERT-style masked prediction (ssl_models/audio/hubert.py): real MFCC targets, a seeded
k-means codebook that is the same wherever it is fit and travels with the method's state, a loss
on the masked time steps only, and one clear line for bad options."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from ssl_models.audio.config import METHODS
from ssl_models.audio.hubert import HuBERT, HuBERTOptions, fit_codebook, frame_features, step_features
from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import sample_seeds
from tests.conftest import losses_on_one_batch, write_params
from tests.ssl_models.test_audio_methods import method_and_rows, one_torch_thread, spoken_like_clips  # noqa: F401


def hubert(root: Path, **options: object) -> tuple[HuBERT, list[dict]]:
    method, rows, _ = method_and_rows(root, "hubert")
    if options:  # the same weights (seed 0), other options
        torch.manual_seed(0)
        method = HuBERT(method.encoder(), HuBERTOptions(**options))
    return method, rows


def test_the_mfcc_targets_are_librosas_mfcc_of_the_audio() -> None:
    """The stored log-mel frames give the MFCCs librosa computes from the waveform (13 + deltas)."""
    clip = spoken_like_clips(1)[0]
    mel = librosa.feature.melspectrogram(y=clip, sr=16000, n_fft=400, hop_length=160, n_mels=32)
    stored = np.log(mel + 1e-6).T.astype(np.float16).astype(np.float32)  # as the shards hold it
    ours = frame_features(stored, "mfcc")
    # librosa's MFCC of the waveform's mel spectrogram in dB (no 80 dB floor: the stored frames have none)
    theirs = librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=13).T
    assert ours.shape == (len(theirs), 39)
    np.testing.assert_allclose(ours[:, :13], theirs, atol=0.02 * np.abs(theirs).max())
    np.testing.assert_allclose(ours[:, 13:26], librosa.feature.delta(theirs.T, mode="nearest").T,
                               atol=0.02 * np.abs(theirs).max())
    # a time step of two frames is their mean; a last step with one real frame is that frame
    steps = step_features(stored[:5], "mfcc", 2)
    np.testing.assert_allclose(steps[0], frame_features(stored[:5], "mfcc")[:2].mean(0), rtol=1e-5)
    np.testing.assert_allclose(steps[2], frame_features(stored[:5], "mfcc")[4], rtol=1e-5)


def test_the_codebook_is_the_same_bits_each_time_and_travels_with_the_state(tmp_path: Path) -> None:
    method, rows = hubert(tmp_path)
    method.prepare(rows)
    again, _ = hubert(tmp_path)
    torch.set_num_threads(2)  # the fit is single-threaded: other thread settings give the same bits
    again.prepare(rows)
    assert int(method.codebook_fitted) == 1
    for name in ("codebook", "feature_mean", "feature_std"):
        assert torch.equal(getattr(method, name), getattr(again, name)), name
    assert method.codebook.abs().sum() > 0 and len(method.codebook.unique(dim=0)) == 100

    # a new method (another seed: other weights, another k-means seed) given the state is the same run
    batch = method.data_side()(rows, sample_seeds(0, 0, range(len(rows))))
    restored = HuBERT(hubert(tmp_path)[0].encoder(), HuBERTOptions())  # built after another: other draws
    assert not torch.equal(restored.kmeans_seed, method.kmeans_seed)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored(batch), method(batch))
    assert torch.equal(restored.codebook, method.codebook)  # its forward used the codebook, fit none


def test_without_prepare_the_first_forward_fits_on_its_batch_once(tmp_path: Path) -> None:
    method, rows = hubert(tmp_path)
    data_side = method.data_side()
    first = data_side(rows, sample_seeds(0, 0, range(len(rows))))
    method(first)
    fitted = method.codebook.clone()
    method(data_side(rows[:4], sample_seeds(0, 1, range(4))))  # a later batch keeps the codebook
    assert torch.equal(method.codebook, fitted)
    # the first batch's real time steps are the rows it was fit on
    real = torch.arange(first["target_features"].shape[1])[None] * 2 < first["lengths"][:, None]
    again, _ = hubert(tmp_path)
    centres, _, _ = fit_codebook(first["target_features"][real].double().numpy(), 100, int(again.kmeans_seed))
    assert torch.equal(fitted, torch.from_numpy(centres))


def test_the_loss_counts_the_masked_time_steps_only(tmp_path: Path) -> None:
    method, rows = hubert(tmp_path)
    method.prepare(rows)
    batch = method.data_side()(rows, sample_seeds(0, 0, range(len(rows))))
    masked = batch["masked_steps"]
    assert masked.any() and not masked.all()
    # spans only over each clip's real steps, about p x steps spans of 10 steps (20 frames, 2 per step)
    real = torch.arange(masked.shape[1])[None] * 2 < batch["lengths"][:, None]
    assert not (masked & ~real).any()
    loss = method(batch)
    unmasked_changed = {**batch, "target_features": torch.where(masked[..., None], batch["target_features"], 99.0)}
    assert torch.equal(method(unmasked_changed), loss)
    masked_changed = {**batch, "target_features": torch.where(masked[..., None], -batch["target_features"],
                                                              batch["target_features"])}
    assert not torch.equal(method(masked_changed), loss)
    # a clip's targets do not depend on the batch it is in
    alone = method.data_side()(rows[:1], sample_seeds(0, 0, [0]))
    assert torch.equal(method.targets(alone["target_features"])[0], method.targets(batch["target_features"])[0])


def test_log_mel_targets_lower_the_loss_too(tmp_path: Path) -> None:
    method, rows = hubert(tmp_path, features="log_mel", num_clusters=20)
    assert method.codebook.shape == (20, 32)
    batch = method.data_side()(rows, sample_seeds(0, 0, range(len(rows))))
    losses = losses_on_one_batch(method, batch, steps=15, learning_rate=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def test_more_clusters_than_time_steps_fail_in_one_line(tmp_path: Path) -> None:
    method, rows = hubert(tmp_path, num_clusters=5000)
    with pytest.raises(PipelineError, match=r"^pretrain.options.num_clusters 5000 exceeds the 400 time steps"):
        method.prepare(rows)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("num_clusters", 1, "num_clusters: must be at least 2"),
    ("mask_probability", 0.0, "mask_probability: must be in (0, 1]"),
    ("mask_length", 0, "mask_length: must be at least 1 frame"),
    ("temperature", -0.1, "temperature: must be positive"),
    ("kmeans_clips", 0, "kmeans_clips: must be at least 1 clip"),
    ("features", "fbank", "features"),
    ("clusters", 100, "clusters"),
])
def test_bad_options_fail_in_one_line_naming_the_key(tmp_path: Path, key: str, value: object, fragment: str) -> None:
    block = {"module": "audio", "corpus": "corpus", "pretrain": {"method": "hubert", "options": {key: value}}}
    write_params(tmp_path, {"domains": {"audio": block}})
    with pytest.raises(PipelineError, match=r"^params.yaml domains.audio.pretrain.options") as failure:
        load_config("audio", tmp_path / "params.yaml")
    assert fragment in str(failure.value) and "\n" not in str(failure.value)


def test_hubert_reads_log_mel_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    block = {"module": "audio", "corpus": "corpus", "preprocess": {"input": "waveform"},
             "pretrain": {"method": "hubert"}}
    write_params(tmp_path, {"domains": {"audio": block}})
    with pytest.raises(PipelineError, match="pretrain.method hubert reads log_mel input"):
        load_config("audio", tmp_path / "params.yaml")
    assert METHODS.get("hubert").checkpoint_rule == "last"  # masked prediction, as TERA and SSAST
