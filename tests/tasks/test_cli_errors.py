"""Errors that name their cause (issue 21): a full disk and a weights file that is not weights-only
are the user's to fix (one line, exit status 2, never retried by the flow, never torch's advice to
set weights_only=False); what the CLI prints from data or file names cannot drive the terminal."""

from __future__ import annotations

import errno
import logging
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from ssl_models.core.errors import PipelineError
from tasks.cli import _PrintableFormatter, main, printable
from tests.conftest import tiny_params, write_params

ESCAPES = "\x1b[31mred\x1b[0m\r\u202e"


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# --- a full disk ------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "No space left on device"),
                                               (errno.EDQUOT, "Disk quota exceeded")])
def test_a_full_disk_is_named_in_one_line_with_exit_status_2(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        code: int, reason: str) -> None:
    written = tiny_project / "data/legal/default/corpus/a.txt"

    def fill(cfg: object, domain: object, paths: object) -> None:
        raise OSError(code, reason, str(written))

    monkeypatch.setattr("tasks.stages.default_data.default_data", fill)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    assert one_line(capsys) == (f"error: default_data@legal stopped: the disk holding {written} is full ({reason}); "
                                "free space on it, or move data/ and models/ to a larger disk, and run again")
    assert not list((tiny_project / ".ssl-pipeline/logs").glob("*.log"))  # no traceback log to fill the disk with


def test_a_full_disk_without_an_errno_is_named_by_the_free_space_left(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torch.save on a full disk raises a bare RuntimeError: the free space left says what happened."""
    import shutil
    from collections import namedtuple

    def fill(cfg: object, domain: object, paths: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr("tasks.stages.default_data.default_data", fill)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    assert one_line(capsys) == (f"error: default_data@legal stopped: the disk holding {tiny_project.resolve()} is full "
                                "(under 64 MiB free after RuntimeError); free space on it, or move data/ and models/ "
                                "to a larger disk, and run again")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 2**30, 9 * 2**30))
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 1  # room left: an unexpected error


def test_a_full_disk_behind_a_library_error_names_the_project_when_file_names_are_hidden(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A library wrapping the OSError (raise ... from it) still reads as a full disk; a domain that
    pseudonymises names the project's disk, not the file."""
    write_params(tiny_project, tiny_params(privacy={"pseudonymise": True}))

    def fill(cfg: object, domain: object, paths: object) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/DOE^JOHN.txt")
        except OSError as error:
            raise RuntimeError("writer failed") from error

    monkeypatch.setattr("tasks.stages.default_data.default_data", fill)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: default_data@legal stopped: the disk holding {tiny_project.resolve()} is full "
                           "(No space left on device)")
    assert "DOE^JOHN" not in line


# --- a weights file that is not weights-only ------------------------------------------------------

def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint whose unpickling would run code (create `marker`)."""

    class Payload:
        def __reduce__(self) -> tuple:
            import os

            return os.mkdir, (str(marker),)

    torch.save({"weight": torch.zeros(2), "extra": Payload(), "args": Namespace(a=1)}, path)
    return path


def test_a_pickle_checkpoint_a_library_loads_is_refused_naming_the_file(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tiny_project / "code-ran"
    checkpoint = malicious_checkpoint(tiny_project / "pytorch_model.bin", marker)

    def load(cfg: object, domain: object, paths: object) -> None:  # as transformers' from_pretrained does
        torch.load(str(checkpoint), map_location="cpu", weights_only=True)

    monkeypatch.setattr("tasks.stages.default_data.default_data", load)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    line = one_line(capsys)
    assert line == (f"error: default_data@legal stopped: {checkpoint} is not a weights-only checkpoint; it was not "
                    "loaded (give a .safetensors file, or a torch state dict of tensors that "
                    "torch.load(weights_only=True) reads)")
    assert not marker.exists() and "weights_only=False" not in line


def test_a_file_that_is_not_safetensors_is_refused_naming_the_file(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    weights = tiny_project / "model.safetensors"
    weights.write_bytes(pickle.dumps({"weight": [0.0] * 8}))
    monkeypatch.setattr("tasks.stages.default_data.default_data", lambda *args: load_file(str(weights)))
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    assert one_line(capsys).startswith(f"error: default_data@legal stopped: {weights} is not a safetensors file (")


def test_a_pickle_as_the_medical_base_checkpoint_is_refused_and_never_run(tmp_path: Path) -> None:
    from ssl_models.medical3d.backbones import read_state

    marker = tmp_path / "code-ran"
    checkpoint = malicious_checkpoint(tmp_path / "base.pt", marker)
    with pytest.raises(PipelineError) as raised:
        read_state(checkpoint)
    assert str(raised.value) == (f"checkpoint {checkpoint} is not a weights-only checkpoint (or is damaged); it was "
                                 "not loaded (give a .safetensors file, or a state dict of tensors saved with "
                                 "torch.save)")
    assert not marker.exists()
    bad = tmp_path / "base.safetensors"
    bad.write_bytes(b"\x80\x04 not safetensors" * 4)
    with pytest.raises(PipelineError, match=r"base\.safetensors is not a safetensors file \(.*\); it was not loaded"):
        read_state(bad)
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "good.pt")  # a weights-only one loads
    assert list(read_state(tmp_path / "good.pt")) == ["w"]


def test_a_pickle_among_resumable_checkpoints_is_moved_aside_never_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its manifest matches (a crafted one): torch.load(weights_only=True) refuses it and it goes to corrupt/."""
    import json

    from ssl_models.core.hashing import sha256_file
    from tasks.checkpoints import Plan, load_checkpoint

    folder, marker = tmp_path / "checkpoints", tmp_path / "code-ran"
    folder.mkdir()
    checkpoint = malicious_checkpoint(folder / "step_00000004.pt", marker)
    (folder / "step_00000004.pt.json").write_text(json.dumps(
        {"format": 3, "step": 4, "fingerprint": "f" * 64, "planned_steps": 12, "decay_start": None,
         "sha256": sha256_file(checkpoint)}))
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        assert load_checkpoint(folder, "f" * 64, Plan(12, None), tidy=True) is None
    assert not marker.exists() and not checkpoint.exists()
    assert (folder / "corrupt/step_00000004.pt").exists() and (folder / "corrupt/step_00000004.pt.json").exists()
    assert "weights_only=False" not in caplog.text and "never loaded" in caplog.text


# --- terminal escapes -----------------------------------------------------------------------------

def test_printable_escapes_control_characters_and_keeps_lines() -> None:
    assert printable(f"a{ESCAPES}b\n\tc\x00\x7f\x9b\u2028é") == (
        "a\\x1b[31mred\\x1b[0m\\r\\u202eb\n\tc\\x00\\x7f\\x9b\\u2028é")
    assert printable("plain: models/legal/finetune") == "plain: models/legal/finetune"
    name = b"scan\xff.txt".decode("utf-8", "surrogateescape")  # a file name that is not UTF-8
    assert printable(name) == "scan\\udcff.txt"


def test_lineage_which_on_a_name_with_escapes_prints_them_escaped(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = f"{ESCAPES}.txt"
    assert main(["--root", str(tiny_project), "lineage", "which", query]) == 0
    out = capsys.readouterr().out
    assert out == "no record \\x1b[31mred\\x1b[0m\\r\\u202e.txt in any manifest (legal)\n"


def test_mismatch_lines_and_the_error_line_are_escaped(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("tasks.lineage.verify", lambda artifact, root: [f"data/legal/manifest/{ESCAPES}: changed"])
    assert main(["--root", str(tiny_project), "lineage", "verify", "data/legal/manifest"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "MISMATCH data/legal/manifest/\\x1b[31mred\\x1b[0m\\r\\u202e: changed"
    assert "\x1b" not in "".join(out)

    def refuse(cfg: object, domain: object, paths: object) -> None:
        raise PipelineError(f"corpus file {ESCAPES}.txt is empty")

    monkeypatch.setattr("tasks.stages.default_data.default_data", refuse)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 2
    assert one_line(capsys) == "error: corpus file \\x1b[31mred\\x1b[0m\\r\\u202e.txt is empty"
    error_file = tiny_project / ".ssl-pipeline/logs/default_data-legal.error"
    assert error_file.read_text() == "error: corpus file \\x1b[31mred\\x1b[0m\\r\\u202e.txt is empty\n"


def test_log_lines_are_escaped() -> None:
    record = logging.LogRecord("ingest", logging.WARNING, __file__, 1, "quarantined %s", (f"{ESCAPES}.txt",), None)
    assert _PrintableFormatter("%(name)s: %(message)s").format(record) == (
        "ingest: quarantined \\x1b[31mred\\x1b[0m\\r\\u202e.txt")
