"""Readers for audio: wav, flac, ogg and mp3 (libsndfile via soundfile), any rate and channel count.

Every file is mixed down to mono and resampled to the configured rate while it streams: blocks
are read with `SoundFile.blocks` and resampled with soxr's streaming resampler, so an hour of
audio never sits in memory at once. A file no longer than `segment_seconds` is one clip named
by its path; a longer one is cut into segments named `file.wav#t=<start seconds>`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile
import soxr

from ssl_models.audio.config import AudioIngestConfig
from ssl_models.core.domain import Record, Rejected
from ssl_models.core.errors import UnreadableFileError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3")
BLOCK_FRAMES = 65536  # frames read at a time: bounds memory whatever the file's length
# samples (frames x channels) read at a time at most: a file of hundreds of channels reads fewer
# frames per block, so a block stays at 2 MiB of float32 (files of up to 8 channels read BLOCK_FRAMES)
BLOCK_SAMPLES = 2 ** 19


def segment_key(key: str, start_seconds: float) -> str:
    """How the labels CSV names a segment of a long recording: `file.wav#t=30`."""
    return f"{key}#t={start_seconds:g}"


def _libsndfile_reason(error: Exception) -> str:
    # LibsndfileError's str() quotes the path; its error_string does not (no file names in reasons)
    return str(getattr(error, "error_string", None) or error).strip().rstrip(".")


def _check_declared_length(sound: soundfile.SoundFile) -> None:
    """libsndfile silently shortens a WAV whose data chunk runs past the end of the file;
    its log says `data : <declared> (should be <found>)`."""
    found = re.search(r"data : (\d+) \(should be (\d+)\)", sound.extra_info)
    if found:
        raise UnreadableFileError(f"truncated file: the data chunk declares {found.group(1)} bytes, "
                                  f"the file holds {found.group(2)}")
    if sound.frames == 0:
        raise UnreadableFileError("zero-length audio: the file holds no samples")


def stream_mono(path: Path, sample_rate: int) -> Iterator[np.ndarray]:
    """float32 mono chunks of the file at `sample_rate`, in order; raises UnreadableFileError."""
    if path.stat().st_size == 0:
        raise UnreadableFileError("empty file (0 bytes)")
    try:
        sound = soundfile.SoundFile(path)
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise UnreadableFileError(f"undecodable audio: {_libsndfile_reason(error)}") from None
    with sound:
        _check_declared_length(sound)
        resampler = (soxr.ResampleStream(sound.samplerate, sample_rate, 1, dtype="float32")
                     if sound.samplerate != sample_rate else None)
        try:
            frames = max(1, min(BLOCK_FRAMES, BLOCK_SAMPLES // max(1, sound.channels)))
            for block in sound.blocks(blocksize=frames, dtype="float32", always_2d=True):
                mono = block.mean(axis=1)
                yield resampler.resample_chunk(mono) if resampler else mono
        except (soundfile.SoundFileError, RuntimeError) as error:
            raise UnreadableFileError(f"truncated or corrupt audio: {_libsndfile_reason(error)}") from None
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def iter_segments(chunks: Iterator[np.ndarray], segment_samples: int) -> Iterator[tuple[int, np.ndarray, bool]]:
    """(start sample, samples, whole file?) for each segment; whole file is True only when the
    stream ended within the first segment."""
    buffered: list[np.ndarray] = []
    n_buffered, start, cut = 0, 0, False
    for chunk in chunks:
        buffered.append(chunk)
        n_buffered += len(chunk)
        while n_buffered > segment_samples:  # strictly more: the file goes on after this segment
            joined = np.concatenate(buffered)
            # copies, not views: a view would keep the whole joined buffer alive
            buffered, n_buffered = [joined[segment_samples:].copy()], n_buffered - segment_samples
            segment = joined[:segment_samples].copy()
            del joined
            yield start, segment, False
            start += segment_samples
            cut = True
    yield start, (np.concatenate(buffered) if buffered else np.zeros(0, np.float32)), not cut


def trim_silence(samples: np.ndarray, silence_db: float) -> np.ndarray:
    import librosa  # imported here: librosa takes a second to import

    trimmed, _ = librosa.effects.trim(samples, top_db=silence_db)
    return trimmed


def read_audio_file(path: Path, key: str, options: AudioIngestConfig) -> Iterator[Record | Rejected]:
    """Yield one record per clip: the file itself, or one per segment of a long recording.
    A record's content is its float32 mono waveform at `options.sample_rate`."""
    rate = options.sample_rate
    folder = Path(key).parent.as_posix()
    group = folder if options.group_by == "folder" and folder != "." else None
    suffix = path.suffix.lower().lstrip(".")
    info_rate, channels, frames = _header(path)
    if frames * channels > options.max_samples:
        raise UnreadableFileError(f"audio too long: the header declares {frames} frames x {channels} channels "
                                  f"({frames * channels} samples) over ingest.max_samples={options.max_samples}")
    chunks = stream_mono(path, rate)
    for start, samples, whole_file in iter_segments(chunks, int(round(options.segment_seconds * rate))):
        clip_key = key if whole_file else segment_key(key, start / rate)
        problem = None
        if options.trim_silence and len(samples):
            samples = trim_silence(samples, options.silence_db)
        if not len(samples) or not np.any(samples):
            problem = "silent: every sample is zero" if len(samples) else "silent: nothing above the silence threshold"
        elif len(samples) < options.min_seconds * rate:
            problem = f"too short: {len(samples) / rate:.3f} s < ingest.min_seconds {options.min_seconds} s"
        if problem is not None:
            if whole_file:
                raise UnreadableFileError(problem)
            yield Rejected(clip_key, problem)
            continue
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        meta = {"format": suffix, "source_sample_rate": info_rate, "channels": channels,
                "seconds": round(len(samples) / rate, 3)}
        if not whole_file:
            meta["start_seconds"] = round(start / rate, 3)
        record = Record(key=clip_key, sha256=hashlib.sha256(samples.tobytes()).hexdigest(),
                        n_bytes=samples.nbytes, meta=meta, content=samples)
        record.group = group  # the speaker's folder keeps all of its clips in one split
        yield record


def _header(path: Path) -> tuple[int, int, int]:
    """Sample rate, channels and frames the header declares (zeros when it does not open)."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError):
        return 0, 0, 0  # stream_mono raises the reason
    frames = int(info.frames)
    unknown = frames < 0 or frames >= 2 ** 62  # libsndfile's SF_COUNT_MAX: a length it cannot tell (streamed)
    return int(info.samplerate), int(info.channels), 0 if unknown else frames
