"""A shard or an encoder damaged after its stage wrote it is detected by the sha256 recorded at
write time (the artifact's lineage.json) and never read: the next stage stops in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_stages, stage_env


def cli(root: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", "--root", str(root), stage, "legal"], cwd=REPO,
                          capture_output=True, text=True, env=stage_env())


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_damaged_shard_or_encoder_is_named_and_never_read(ingested_project: Path) -> None:
    shard = min((ingested_project / "data/legal/shards").rglob("*.arrow"))
    flip_a_byte(shard)
    result = cli(ingested_project, "pretrain")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert shard.relative_to(ingested_project).as_posix() in line and "content changed" in line
    assert "preprocess@legal" in line
    assert not (ingested_project / "models/legal/checkpoints").exists()  # nothing trained on it
    flip_a_byte(shard)  # restored: the stage runs
    run_stages(ingested_project, "legal", "pretrain")

    weights = ingested_project / "models/legal/pretrain/encoder/model.safetensors"
    flip_a_byte(weights)
    result = cli(ingested_project, "finetune")
    assert result.returncode == 2 and "models/legal/pretrain/encoder/model.safetensors: content changed" \
        in result.stderr, result.stderr
    assert not (ingested_project / "models/legal/finetune").exists()
