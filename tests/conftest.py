"""Shared fixtures: a tiny real legal corpus (license texts from licensedcode-data) and a
project folder with tiny params, so the stages run in seconds."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.cli import OFFLINE_ENV

for key, value in {**OFFLINE_ENV, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent

TINY_LEGAL = {
    "module": "legal_text",
    "corpus": "data/legal/default/corpus",
    "labels": "data/legal/default/labels.csv",
    "default_data": {"max_files": 60},
    "split": {"val": 0.1, "test": 0.25, "salt": "split-v1"},
    "ingest": {},
    "preprocess": {"tokenizer": "train", "vocab_size": 400, "min_frequency": 2, "block_size": 32},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 32},
    "pretrain": {"method": "mlm", "steps": 12, "batch_size": 8, "learning_rate": 0.002, "warmup_steps": 2,
                 "checkpoint_every": 4, "rankme_samples": 32, "seed": 0},
    "finetune": {"label_fractions": [0.1, 1.0], "seeds": [0, 1, 2], "protocols": ["linear", "knn", "finetune"],
                 "steps": 3, "batch_size": 8},
}


def tiny_params(**overrides: dict) -> dict:
    block = copy.deepcopy(TINY_LEGAL)
    for section, values in overrides.items():
        if isinstance(values, dict):
            block.setdefault(section, {}).update(values)
        else:
            block[section] = values
    return {"domains": {"legal": block}}


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder with tiny legal params; the working directory is set there."""
    write_params(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ingested_project(tiny_project: Path) -> Path:
    """tiny_project with the default data laid out, ingested and preprocessed."""
    from tasks.default_data import default_data
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess

    default_data("legal")
    ingest("legal")
    preprocess("legal")
    return tiny_project


def copy_project_code(folder: Path) -> None:
    """Make `folder` a DVC project running this checkout's stages (git + dvc initialised)."""
    for name in ("ssl_models", "tasks", "flows"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", folder / ".gitignore")
    run = lambda *args: subprocess.run(args, cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(str(SCRIPTS / "dvc"), "init", "-q")
    run(str(SCRIPTS / "dvc"), "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")


def stage_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}"}
