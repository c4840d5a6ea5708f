"""The audio domain through the stages: generated default data, speaker-disjoint splits,
quarantine in ingest, and the whole path on a folder of mixed formats and rates."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tasks.io import read_json, read_jsonl
from tests.conftest import run_stages, write_params
from tests.ssl_models.test_audio_readers import FSDD, write_bad_files

TINY_AUDIO = {
    "module": "audio",
    "corpus": "data/audio/default/corpus",
    "labels": "data/audio/default/labels.csv",
    "cpu_threads": 1,
    "default_data": {"speakers": 8, "takes": 1, "sentences": True},
    "split": {"val": 0.2, "test": 0.25, "salt": "split-v1"},
    "ingest": {"sample_rate": 8000, "segment_seconds": 4.0, "group_by": "folder"},
    "preprocess": {"input": "log_mel", "n_mels": 16, "n_fft": 200, "hop_length": 80, "clip_seconds": 0.8},
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    "pretrain": {"method": "tera", "steps": 6, "batch_size": 8, "learning_rate": 0.002, "warmup_steps": 1,
                 "checkpoint_every": 3, "rankme_samples": 16, "seed": 0},
    "finetune": {"label_fractions": [1.0], "seeds": [0, 1], "protocols": ["linear", "knn", "finetune"],
                 "max_steps": 2, "batch_size": 8},
}


def audio_params(**sections: dict) -> dict:
    block = json.loads(json.dumps(TINY_AUDIO))
    for name, values in sections.items():
        if isinstance(values, dict):
            block.setdefault(name, {}).update(values)
        else:
            block[name] = values
    return {"domains": {"audio": block}}


@pytest.fixture
def audio_project(tmp_path: Path) -> Iterator[Path]:
    """A project folder with tiny audio params. The stages set torch's thread count
    (cpu_threads) for the whole process, so it is restored afterwards: later tests that
    compare a subprocess's weights with their own need the default."""
    import torch

    threads = torch.get_num_threads()
    write_params(tmp_path, audio_params())
    yield tmp_path
    torch.set_num_threads(threads)


def corpus_digest(folder: Path) -> str:
    """The corpus' files and the labels (not the lineage record, which holds times)."""
    digest = hashlib.sha256()
    for path in sorted([*(folder / "corpus").rglob("*.wav"), folder / "labels.csv"]):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_the_generated_default_is_the_same_files_every_run_and_splits_never_share_a_speaker(
        audio_project: Path) -> None:
    default = audio_project / "data/audio/default"
    run_stages(audio_project, "audio", "default_data")
    first = corpus_digest(default)
    run_stages(audio_project, "audio", "default_data")
    assert corpus_digest(default) == first
    with open(default / "labels.csv", newline="") as handle:
        labels = list(csv.DictReader(handle))
    assert len(labels) == 8 * 10 and {r["label"] for r in labels} == {str(d) for d in range(10)}
    [summary] = run_stages(audio_project, "audio", "ingest")
    assert summary["quarantined"] == 0 and summary["labeled"] == 80
    rows = read_jsonl(audio_project / "data/audio/manifest/manifest.jsonl")
    passages = [r for r in rows if "passage.wav#t=" in r["key"]]
    assert len(passages) >= 8  # each speaker's passage is longer than one 4 s segment
    split_of_group: dict[str, set[str]] = {}
    for row in rows:
        split_of_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_group.values()), split_of_group
    assert {"train", "test"} <= {s for splits in split_of_group.values() for s in splits}


def test_ingest_quarantines_each_bad_file_with_its_reason_and_keeps_the_good_ones(audio_project: Path) -> None:
    expected = write_bad_files(audio_project / "corpus")
    soundfile.write(audio_project / "corpus" / "good.wav", 0.3 * np.sin(np.arange(8000) / 3.0), 16000)
    (audio_project / "corpus" / "notes.txt").write_text("not audio")
    # every file but one is bad on purpose: above the default share that stops a run at ingest
    write_params(audio_project, audio_params(corpus="corpus", labels=None, ingest={"max_quarantined_fraction": 1.0}))
    [summary] = run_stages(audio_project, "audio", "ingest")
    reasons = {q["key"]: q["reason"] for q in read_jsonl(audio_project / "data/audio/manifest/quarantine.jsonl")}
    assert summary["records"] == 1
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons.get(name))
    assert "unsupported file type" in reasons["notes.txt"]


def write_mixed_format_corpus(root: Path, default_corpus: Path) -> None:
    """The generated speech re-encoded as flac, ogg, mp3 and wav at 8 to 48 kHz, mono and stereo,
    in per-speaker folders; labels written with ./ and backslashes, speaker as group."""
    import soxr

    corpus = root / "calls"
    formats = [("flac", 44100, 1), ("ogg", 16000, 2), ("mp3", 22050, 1), ("wav", 8000, 2), ("wav", 48000, 1)]
    rows = []
    for index, path in enumerate(sorted(default_corpus.glob("*/[0-9]_0.wav"))):
        samples, rate = soundfile.read(path, dtype="float32")
        suffix, new_rate, channels = formats[index % len(formats)]
        samples = soxr.resample(samples, rate, new_rate)
        if channels == 2:
            samples = np.stack([samples, 0.5 * samples], axis=1)
        speaker = path.parent.name
        (corpus / speaker).mkdir(parents=True, exist_ok=True)
        target = corpus / speaker / f"{path.stem}.{suffix}"
        soundfile.write(target, samples, new_rate)
        written = f"./{speaker}/{target.name}" if index % 2 else f"{speaker}\\{target.name}"
        rows.append((written, path.stem.split("_")[0], speaker))
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)


@pytest.mark.slow
@pytest.mark.parametrize("method,input_kind,backbone", [("tera", "log_mel", "spectrogram_transformer"),
                                                        ("wav2vec2", "waveform", "wav2vec2")])
def test_whole_audio_path_on_a_mixed_format_folder(audio_project: Path, method: str, input_kind: str,
                                                   backbone: str) -> None:
    from ssl_models.audio.default_data import write_spoken_digits

    write_spoken_digits(audio_project / "generated", n_speakers=8, takes=1, sentences=False)
    write_mixed_format_corpus(audio_project, audio_project / "generated" / "corpus")
    write_params(audio_project, audio_params(corpus="calls", labels="labels.csv", pretrain={"method": method},
                                             preprocess={"input": input_kind}, model={"backbone": backbone}))
    run_stages(audio_project, "audio", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report")
    summary = read_json(audio_project / "data/audio/manifest/summary.json")
    assert summary["quarantined"] == 0 and summary["labels_without_file"] == 0
    assert summary["labeled"] == summary["records"] == 80
    shards = read_json(audio_project / "data/audio/shards/summary.json")
    assert shards["input"] == input_kind and shards["labeled_test_exact_copies_in_pretraining"] == 0
    assert (audio_project / "models/audio/pretrain/encoder/audio_input.json").exists()
    metrics = read_json(audio_project / "reports/audio/metrics.json")
    assert {r["init"] for r in metrics["results"]} == {"ssl", "scratch", "baseline"}
    assert (audio_project / "reports/audio/report/report.html").read_text().startswith("<!doctype html>")


@pytest.mark.skipif(not FSDD.is_dir(), reason="shared FSDD recordings (../shared/data/audio-fsdd) not present")
def test_fsdd_speakers_never_cross_splits(audio_project: Path) -> None:
    corpus = audio_project / "fsdd"
    corpus.mkdir()
    rows = []
    for path in sorted(FSDD.glob("*_*_[0-4].wav")):  # 5 takes of each digit by each of the 6 speakers
        (corpus / path.name).symlink_to(path)
        digit, speaker, _ = path.stem.split("_")
        rows.append((path.name, digit, speaker))
    with open(audio_project / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    write_params(audio_project, audio_params(corpus="fsdd", labels="labels.csv", ingest={"follow_symlinks": True},
                                             split={"val": 0.1, "test": 0.1, "salt": "split-v1"}))
    [summary] = run_stages(audio_project, "audio", "ingest")
    assert summary["labeled"] == 300 and summary["quarantined"] == 0
    manifest = read_jsonl(audio_project / "data/audio/manifest/manifest.jsonl")
    speakers_by_split: dict[str, set[str]] = {}
    for row in manifest:
        speakers_by_split.setdefault(row["split"], set()).add(row["group"])
    assert speakers_by_split["test"] == {"nicolas", "theo"}  # the split the FSDD benchmark reports on
    assert not speakers_by_split["test"] & (speakers_by_split["train"] | speakers_by_split.get("val", set()))


@pytest.mark.slow
@pytest.mark.skipif(not FSDD.is_dir(), reason="shared FSDD recordings (../shared/data/audio-fsdd) not present")
def test_a_run_on_real_recordings_exports_an_encoder_that_loads_and_matches_elsewhere(audio_project: Path) -> None:
    """Real speech at its own rate (8 kHz, 0.3-0.8 s clips), not the generated default: the export
    of the run loads without the project and embeds its rows as the pipeline does."""
    import torch

    from ssl_models.audio.features import decode_row
    from ssl_models.core.config import load_config
    from tasks.export import export
    from tasks.paths import DomainPaths
    from tests.tasks.test_export import load_elsewhere

    corpus = audio_project / "fsdd"
    corpus.mkdir()
    for path in sorted(FSDD.glob("*_*_[0-1].wav")):
        (corpus / path.name).symlink_to(path)
    write_params(audio_project, audio_params(corpus="fsdd", labels=None, model={"pool_segments": 2},
                                             ingest={"follow_symlinks": True}))  # links to the shared recordings
    run_stages(audio_project, "audio", "ingest", "preprocess", "pretrain")
    folder = export(audio_project, "audio")
    cfg, domain = load_config("audio", audio_project / "params.yaml")
    paths = DomainPaths("audio", audio_project)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    dataset = domain.pretrain_dataset(paths.shards, "train")
    rows = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 8))]
    with torch.no_grad():
        ours = encoder(encoder.collate(rows))
    torch.save([torch.from_numpy(decode_row(row, encoder.spec.width)) for row in rows], audio_project / "clips.pt")
    gap = (load_elsewhere(folder, audio_project / "clips.pt", audio_project) - ours).abs().max().item()
    assert gap < 1e-5, gap


def test_continued_pretraining_from_a_local_checkpoint_and_the_generic_init(audio_project: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    pretrained = audio_project / "models/audio/pretrain"
    run_stages(audio_project, "audio", "default_data", "ingest", "preprocess", "pretrain")
    shutil.copytree(pretrained / "encoder", audio_project / "base_encoder")
    first_losses = [loss for _, loss in read_json(pretrained / "log.json")["loss"]]
    # relative to the project root, not to the working directory
    write_params(audio_project, audio_params(
        model={"base_checkpoint": "base_encoder"},
        finetune={"inits": ["ssl", "scratch", "generic"], "seeds": [0], "protocols": ["linear", "knn"]}))
    run_stages(audio_project, "audio", "pretrain", "finetune", "evaluate")
    continued_losses = [loss for _, loss in read_json(pretrained / "log.json")["loss"]]
    assert continued_losses[0] < first_losses[0]  # it starts from the checkpoint, not from random weights
    base = load_file(str(audio_project / "base_encoder/model.safetensors"))
    continued = load_file(str(pretrained / "encoder/model.safetensors"))
    assert not torch.equal(base["patch_embedding.weight"], continued["patch_embedding.weight"])
    metrics = read_json(audio_project / "reports/audio/metrics.json")
    assert {r["init"] for r in metrics["results"]} == {"ssl", "scratch", "generic"}
