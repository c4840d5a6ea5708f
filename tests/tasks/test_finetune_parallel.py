"""finetune with its (init, seed) jobs spread over worker processes gives the serial run's bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.cli import run_stage
from tasks.io import read_json
from tests.conftest import write_params


def finetune_outputs(root: Path, nproc: int) -> tuple[bytes, dict[str, bytes], dict]:
    """Run finetune for legal from scratch with `finetune.nproc` and one torch thread per job
    (what 2 workers get on 2 cores: bit-identical needs equal threads); return the bytes of
    results.json and embedding_2d.json, every saved model file's bytes by relative path, and
    the run record."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["domains"]["legal"]["cpu_threads"] = 1
    params["domains"]["legal"]["finetune"]["nproc"] = nproc
    write_params(root, params)
    folder = root / "models/legal/finetune"
    shutil.rmtree(folder, ignore_errors=True)
    run_stage("finetune", "legal", root)
    models = {path.relative_to(folder).as_posix(): path.read_bytes()
              for path in sorted((folder / "models").rglob("*")) if path.is_file()}
    outputs = (folder / "results.json").read_bytes() + (folder / "embedding_2d.json").read_bytes()
    return outputs, models, read_json(root / "models/legal/.finetune.run.json")


@pytest.mark.slow
def test_two_processes_give_the_serial_results_and_models(pretrained_project: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_PIPELINE_DEVICE", "cpu")  # bit-identical on the CPU; GPUs only come close
    ingested_project = pretrained_project
    serial_results, serial_models, serial_run = finetune_outputs(ingested_project, nproc=1)
    spread_results, spread_models, spread_run = finetune_outputs(ingested_project, nproc=2)
    assert (serial_run["processes"], spread_run["processes"]) == (1, 2)
    assert spread_results == serial_results
    saved = read_json(ingested_project / "models/legal/finetune/results.json")
    settings = yaml.safe_load((ingested_project / "params.yaml").read_text())["domains"]["legal"]["finetune"]
    # every init's protocols at both fractions x 3 seeds (the baseline: linear only)
    assert len(saved["results"]) == sum(1 if init == "baseline" else 3 for init in saved["inits"]) * 2 * 3
    assert settings["label_fractions"] == [0.1, 1.0] and {"ssl", "scratch"} <= set(saved["inits"])
    assert serial_models and any(name.endswith("head.safetensors") for name in serial_models)
    assert spread_models.keys() == serial_models.keys()
    assert [name for name in serial_models if spread_models[name] != serial_models[name]] == []
