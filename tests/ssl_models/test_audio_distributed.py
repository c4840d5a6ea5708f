"""The audio methods on 2 processes (DDP, gloo on this CPU) with half the batch each end where
1 process with the whole batch ends: the same first loss and the same weights after 3 steps.

The spectrogram backbone and the small wav2vec2 have no BatchNorm and no dropout (model.dropout
0), and every random draw (TERA's alterations, SSAST's token masks, wav2vec2's span masks,
distractors and Gumbel noise, HuBERT's span masks) comes from the clip's own seed, so only float
rounding differs: the gradients are summed in another order (DDP's all-reduce of two half-batch
means). HuBERT's k-means codebook, fit at the first step on the batch gathered from every process
in rank order, is the same bits on one process or two; a run resumed from a checkpoint takes it
from there."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from tasks.cli import run_stage
from tasks.io import read_json
from tests.conftest import assert_close_weights, pretrained_state, run_stages, write_params
from tests.ssl_models.test_audio_pipeline import audio_params

pytestmark = pytest.mark.slow

# Float32 rounding: the gradients agree to ~5e-7 relative and the first loss to ~1e-7, but
# AdamW's step is lr * m / (sqrt(v) + eps): an element whose gradient is near zero moves by
# another fraction of lr when its sum is taken in another order (measured: 3.7e-5 on 5 of TERA's
# 3456 weights after 3 steps with lr 0.002). So weights within 1e-4 (5% of lr); a real gradient
# error (a missing gather gradient, a wrong mean) flips the step of many elements, by up to 2 lr.
WEIGHT_ATOL, LOSS_RTOL = 1e-4, 1e-5
SETTINGS = {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "warmup_steps": 0, "num_workers": 0}
INPUTS = {"tera": "log_mel", "masked_spectrogram": "log_mel", "wav2vec2": "waveform", "hubert": "log_mel"}
BACKBONES = {"log_mel": "spectrogram_transformer", "waveform": "wav2vec2"}


def params(method: str) -> dict:
    kind = INPUTS[method]
    return audio_params(preprocess={"input": kind}, model={"backbone": BACKBONES[kind], "dropout": 0.0},
                        pretrain={"method": method})


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Shards made once per input kind: the default data ingested once, preprocessed twice."""
    threads = torch.get_num_threads()
    log_mel = tmp_path_factory.mktemp("audio_log_mel")
    write_params(log_mel, params("tera"))
    run_stages(log_mel, "audio", "default_data", "ingest", "preprocess")
    waveform = tmp_path_factory.mktemp("audio_waveform")
    shutil.copytree(log_mel / "data", waveform / "data")
    shutil.rmtree(waveform / "data/audio/shards")
    write_params(waveform, params("wav2vec2"))
    run_stages(waveform, "audio", "preprocess")
    yield {"log_mel": log_mel, "waveform": waveform}
    torch.set_num_threads(threads)  # the stages set cpu_threads for the whole test process


@pytest.mark.parametrize("method", list(INPUTS))
def test_two_processes_with_half_the_batch_each_end_where_one_process_ends(projects: dict[str, Path],
                                                                           method: str) -> None:
    root = projects[INPUTS[method]]
    write_params(root, params(method))
    single = pretrained_state(root, "audio", nproc=1, **SETTINGS)
    double = pretrained_state(root, "audio", nproc=2, **SETTINGS)
    assert [step for step, _ in single[1]["loss"]] == [step for step, _ in double[1]["loss"]] == [1, 2, 3]
    first, again = single[1]["loss"][0][1], double[1]["loss"][0][1]
    print(f"\n{method}: first loss {first:.6f} and {again:.6f}, relative difference {abs(first - again) / first:.2e}")
    assert again == pytest.approx(first, rel=LOSS_RTOL)
    assert_close_weights(WEIGHT_ATOL, single[0], double[0], method)


def test_loader_workers_change_nothing(projects: dict[str, Path]) -> None:
    root = projects["log_mel"]
    write_params(root, params("masked_spectrogram"))
    inline, _ = pretrained_state(root, "audio", nproc=1, **{**SETTINGS, "num_workers": 0})
    workers, _ = pretrained_state(root, "audio", nproc=1, **{**SETTINGS, "num_workers": 2})
    assert inline.keys() == workers.keys()
    for name in inline:
        assert torch.equal(inline[name], workers[name]), name


def test_hubert_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(
        projects: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    root = projects["log_mel"]
    write_params(root, params("hubert"))
    uninterrupted, log = pretrained_state(root, "audio", nproc=1, **{**SETTINGS, "steps": 4, "checkpoint_every": 2,
                                                                       "keep_checkpoints": 4})
    # as if killed after the checkpoint of step 2: the later checkpoint and the outputs are gone
    models = root / "models/audio"
    for path in (models / "checkpoints").glob("step_00000004.pt*"):
        path.unlink()
    shutil.rmtree(models / "pretrain")
    caplog.set_level(logging.INFO, logger="pretrain")
    run_stage("pretrain", "audio", root)
    assert "resuming audio pretraining from step 2" in caplog.text
    assert "codebook" not in caplog.text  # restored with the checkpoint, not fit again on step 3's batch
    resumed = {f"{path.name}:{k}": v for path in sorted((models / "pretrain/encoder").glob("*.safetensors"))
               for k, v in load_file(str(path)).items()}
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    assert read_json(models / "pretrain/log.json")["loss"] == log["loss"]
