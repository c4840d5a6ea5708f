"""Audio readers: every format and rate, mix-down, resampling, segments in bounded memory, quarantine."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ssl_models.audio.config import AudioIngestConfig
from ssl_models.audio.readers import read_audio_file
from ssl_models.core.domain import Record, Rejected
from ssl_models.core.errors import UnreadableFileError

FSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "audio-fsdd" / "recordings"


def tone(seconds: float, rate: int, frequency: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def records(path: Path, **options) -> list[Record | Rejected]:
    return list(read_audio_file(path, path.name, AudioIngestConfig(**options)))


@pytest.mark.parametrize("suffix,rate,channels", [
    ("wav", 8000, 1), ("wav", 44100, 2), ("flac", 22050, 1), ("flac", 48000, 6),
    ("ogg", 16000, 2), ("mp3", 44100, 1), ("mp3", 22050, 2),
])
def test_each_format_and_rate_becomes_a_mono_clip_at_the_configured_rate(
        tmp_path: Path, suffix: str, rate: int, channels: int) -> None:
    path = tmp_path / f"clip.{suffix}"
    soundfile.write(path, tone(1.5, rate, 440.0, channels), rate)
    [record] = records(path, sample_rate=16000)
    assert record.key == "clip." + suffix
    assert record.content.ndim == 1 and record.content.dtype == np.float32
    # mp3 encoders add up to a few hundred ms of padding; the others keep the length exactly
    assert abs(len(record.content) / 16000 - 1.5) < (0.1 if suffix == "mp3" else 0.002)
    assert abs(dominant_frequency(record.content, 16000) - 440.0) < 3.0  # pitch survives resampling
    assert record.meta["source_sample_rate"] == rate and record.meta["channels"] == channels


def test_stereo_is_mixed_down_not_cut_to_one_channel(tmp_path: Path) -> None:
    left, right = tone(1.0, 16000, 300.0), tone(1.0, 16000, 1200.0)
    soundfile.write(tmp_path / "two.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    [record] = records(tmp_path / "two.wav", sample_rate=16000)
    np.testing.assert_allclose(record.content, (left + right) / 2, atol=1e-6)


def _read_long_file(path: Path, minutes: int) -> tuple[list[str], int, int]:
    """Write `minutes` of 44.1 kHz stereo FLAC a minute at a time, stream it; (keys, largest array, peak bytes)."""
    with soundfile.SoundFile(path, "w", samplerate=44100, channels=2, format="FLAC") as out:
        for minute in range(minutes):
            out.write(tone(60.0, 44100, 200.0 + 100 * minute, channels=2))
    tracemalloc.start()
    keys, largest = [], 0
    for record in read_audio_file(path, path.name, AudioIngestConfig(sample_rate=16000, segment_seconds=30.0)):
        keys.append(record.key)
        largest = max(largest, record.content.nbytes)
        record.content = None  # as ingest does: the manifest keeps hashes, not samples
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return keys, largest, peak


def test_a_long_recording_streams_as_segments_in_bounded_memory(tmp_path: Path) -> None:
    segment_bytes = 30 * 16000 * 4
    keys, largest, peak_short = _read_long_file(tmp_path / "short.flac", 2)
    assert keys == [f"short.flac#t={30 * i}" for i in range(4)]
    keys, largest, peak_long = _read_long_file(tmp_path / "long.flac", 4)
    assert keys == [f"long.flac#t={30 * i}" for i in range(8)]
    assert largest == segment_bytes
    # memory depends on the segment length, not on the recording's (4 min at 16 kHz float32 is 15 MB)
    assert peak_long < 5 * segment_bytes, f"peak {peak_long / 1e6:.1f} MB"
    assert peak_long < 1.2 * peak_short, (peak_short, peak_long)


def test_segments_keep_their_own_content_and_a_short_tail_is_rejected_with_a_reason(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "talk.wav", np.concatenate([tone(10.0, 16000, 300.0), tone(10.0, 16000, 900.0),
                                                           tone(0.05, 16000, 500.0)]), 16000)
    found = records(tmp_path / "talk.wav", sample_rate=16000, segment_seconds=10.0, min_seconds=0.1)
    first, second, tail = found
    assert (first.key, second.key) == ("talk.wav#t=0", "talk.wav#t=10")
    assert abs(dominant_frequency(first.content, 16000) - 300) < 2 and abs(dominant_frequency(second.content, 16000) - 900) < 2
    assert first.meta["start_seconds"] == 0 and second.meta["start_seconds"] == 10
    assert isinstance(tail, Rejected) and tail.key == "talk.wav#t=20" and "too short" in tail.reason


def write_bad_files(folder: Path) -> dict[str, str]:
    """Each bad case of the issue, named after it; returns file name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    soundfile.write(folder / "zero_length.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(folder / "full.wav", tone(2.0, 16000), 16000)
    raw = (folder / "full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(raw[: len(raw) // 2])
    soundfile.write(folder / "full.flac", tone(2.0, 16000), 16000)
    raw = (folder / "full.flac").read_bytes()
    (folder / "truncated.flac").write_bytes(raw[: len(raw) // 2])
    (folder / "full.wav").unlink()
    (folder / "full.flac").unlink()
    (folder / "undecodable.mp3").write_bytes(b"this is not audio at all " * 40)
    soundfile.write(folder / "silent.ogg", np.zeros(16000, np.float32), 16000)
    return {"empty.wav": "empty file", "zero_length.wav": "zero-length", "truncated.wav": "truncated",
            "truncated.flac": "truncated or corrupt", "undecodable.mp3": "undecodable", "silent.ogg": "silent"}


def test_bad_files_raise_a_reason_without_the_file_name(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path / "bad")
    for name, fragment in expected.items():
        with pytest.raises(UnreadableFileError) as caught:
            records(tmp_path / "bad" / name)
        assert fragment in caught.value.reason, (name, caught.value.reason)
        assert name not in caught.value.reason and str(tmp_path) not in caught.value.reason


def test_silence_trimming_keeps_the_sound_and_drops_the_pauses(tmp_path: Path) -> None:
    quiet = np.zeros(16000, np.float32)
    soundfile.write(tmp_path / "word.wav", np.concatenate([quiet, tone(0.5, 16000), quiet]), 16000)
    [kept] = records(tmp_path / "word.wav", trim_silence=False)
    [trimmed] = records(tmp_path / "word.wav", trim_silence=True, silence_db=40.0)
    assert abs(kept.meta["seconds"] - 2.5) < 1e-3
    assert 0.45 < trimmed.meta["seconds"] < 0.65


def test_the_folder_is_the_group_when_asked(tmp_path: Path) -> None:
    (tmp_path / "speaker7").mkdir()
    soundfile.write(tmp_path / "speaker7" / "a.wav", tone(0.5, 16000), 16000)
    [record] = read_audio_file(tmp_path / "speaker7" / "a.wav", "speaker7/a.wav", AudioIngestConfig(group_by="folder"))
    [ungrouped] = read_audio_file(tmp_path / "speaker7" / "a.wav", "speaker7/a.wav", AudioIngestConfig())
    assert record.group == "speaker7" and ungrouped.group is None


@pytest.mark.skipif(not FSDD.is_dir(), reason="shared FSDD recordings (../shared/data/audio-fsdd) not present")
def test_real_fsdd_recordings_read_at_8khz_and_resample() -> None:
    path = FSDD / "7_jackson_0.wav"
    [record] = records(path, sample_rate=16000)
    assert record.meta["source_sample_rate"] == 8000
    assert abs(len(record.content) / 16000 - soundfile.info(str(path)).duration) < 1e-3
    assert 0.05 < float(np.abs(record.content).max()) <= 1.0
