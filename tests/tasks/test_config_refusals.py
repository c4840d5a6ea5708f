"""params.yaml cannot half-load: a file that is not UTF-8 YAML, a block cut off before sections
dvc.yaml declares, non-finite or absurd numbers: each refused when a stage starts, in one line,
exit status 2, before any work (issue 21)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.cli import main
from tests.conftest import REPO, tiny_params, write_params


def refusal(root: Path, capsys: pytest.CaptureFixture[str], stage: str = "ingest") -> str:
    """The one line `ssl-pipeline STAGE legal` prints, asserting exit status 2 and that nothing ran."""
    assert main(["--root", str(root), stage, "legal"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert not (root / "data").exists()  # refused before any stage work
    return err[0]


def test_a_params_file_of_random_bytes_is_refused_naming_the_file(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_project / "params.yaml"
    start = b"domains:\n  legal:\n    module: legal_text\n"
    params.write_bytes(start + bytes(range(0x80, 0x100)))
    assert refusal(tiny_project, capsys) == (
        f"error: {params} is not UTF-8 text (byte 0x80 on line 4, offset {len(start)}); it must be a YAML file "
        "in UTF-8")


def test_a_params_file_that_is_not_yaml_or_not_a_mapping_is_refused(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_project / "params.yaml"
    params.write_text("domains:\n  legal: {module: legal_text\n")
    assert refusal(tiny_project, capsys).startswith(f"error: {params} is not valid YAML: ")
    params.write_text("- domains\n- legal\n")
    assert refusal(tiny_project, capsys) == f"error: {params}: expected a mapping with a `domains:` block"
    # a block pasted twice: PyYAML would keep the last silently, DVC (ruamel.yaml) refuses the file
    params.write_text("domains:\n  legal: {module: legal_text}\n  legal: {module: audio}\n")
    line = refusal(tiny_project, capsys)
    assert line.startswith(f"error: {params} is not valid YAML: key 'legal' appears twice in one mapping"), line


def cut_off(root: Path, *missing: str) -> None:
    """The tiny legal block without `missing`, beside the repository's dvc.yaml."""
    params = tiny_params()
    for key in missing:
        del params["domains"]["legal"][key]
    write_params(root, params)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")


def test_a_block_cut_off_before_sections_dvc_declares_is_refused_naming_them(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut_off(tiny_project, "pretrain", "finetune")
    assert refusal(tiny_project, capsys) == (
        "error: params.yaml domains.legal lacks pretrain, finetune, which dvc.yaml declares as parameters of its "
        "stages (a cut-off file?); add them back (null or {} takes the defaults)")
    # present but empty takes the defaults: a user relying on them says so
    params = tiny_params(pretrain=None, finetune=None)
    write_params(tiny_project, params)
    from ssl_models.core.config import FinetuneConfig, load_config

    cfg, _ = load_config("legal", tiny_project / "params.yaml")
    assert cfg.finetune == FinetuneConfig()


def test_without_a_dvc_pipeline_missing_sections_take_their_defaults(tiny_project: Path) -> None:
    """No dvc.yaml beside params.yaml: nothing declares the sections, DVC runs nothing, defaults hold."""
    from ssl_models.core.config import FinetuneConfig, load_config

    params = tiny_params()
    del params["domains"]["legal"]["finetune"]
    write_params(tiny_project, params)
    assert load_config("legal", tiny_project / "params.yaml")[0].finetune == FinetuneConfig()


def test_dvc_finds_the_same_parameters_missing_as_the_refusal_names(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DVC's own view: the params dependencies it cannot hash (`dvc repro` fails on them after the
    command ran, `dvc status` calls them deleted) are the ones the stage refuses to start without."""
    from dvc.dependency.param import MissingParamsError, ParamsDependency
    from dvc.parsing import ResolveError
    from dvc.repo import Repo

    def dvc_missing() -> set[str]:
        missing = set()
        with Repo(str(tiny_project)) as repo:
            for stage in repo.index.stages:
                for dep in stage.deps:
                    if isinstance(dep, ParamsDependency):
                        try:
                            dep.get_hash()
                        except MissingParamsError as error:
                            missing |= {key for key in dep.params if key in str(error)}
        return missing

    Repo.init(str(tiny_project), no_scm=True).close()
    cut_off(tiny_project, "cpu_threads", "privacy", "finetune")
    assert dvc_missing() == {"domains.legal.cpu_threads", "domains.legal.privacy", "domains.legal.finetune"}
    assert "lacks privacy, cpu_threads, finetune, which dvc.yaml declares" in refusal(tiny_project, capsys)
    # a key dvc.yaml also interpolates (`${item.labels}`): DVC cannot even read its pipeline
    cut_off(tiny_project, "labels")
    with pytest.raises(ResolveError, match="Could not find 'item.labels'"):
        dvc_missing()
    assert "lacks labels, which dvc.yaml declares" in refusal(tiny_project, capsys)
    cut_off(tiny_project)
    assert dvc_missing() == set()
    from ssl_models.core.config import load_config

    load_config("legal", tiny_project / "params.yaml")


@pytest.mark.parametrize(("overrides", "line"), [
    ({"pretrain": {"learning_rate": float("inf")}}, "domains.legal.pretrain.learning_rate: .inf"),
    ({"finetune": {"learning_rate": float("nan")}}, "domains.legal.finetune.learning_rate: .nan"),
    ({"finetune": {"label_fractions": [0.1, float("-inf")]}}, "domains.legal.finetune.label_fractions[1]: -.inf"),
    ({"pretrain": {"options": {"mlm_probability": float("nan")}}},
     "domains.legal.pretrain.options.mlm_probability: .nan"),
    ({"split": {"val": float("nan")}}, "domains.legal.split.val: .nan"),
])
def test_a_non_finite_number_anywhere_in_the_block_is_refused(
        tiny_project: Path, capsys: pytest.CaptureFixture[str], overrides: dict, line: str) -> None:
    write_params(tiny_project, tiny_params(**overrides))
    assert refusal(tiny_project, capsys) == f"error: params.yaml {line} is not a finite number"


def test_a_non_finite_number_in_the_chosen_preset_is_refused(
        tiny_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    faster = {"pretrain": {"learning_rate": float("inf")}}
    write_params(tiny_project, tiny_params(preset="faster", presets={"faster": faster}))
    assert refusal(tiny_project, capsys) == ("error: params.yaml domains.legal.presets.faster.pretrain.learning_rate: "
                                             ".inf is not a finite number")


@pytest.mark.parametrize(("overrides", "line"), [
    ({"finetune": {"learning_rate": -0.001}},
     "domains.legal.finetune: learning_rate and head_learning_rate must be >= 0 (0: that part stays as it starts)"),
    ({"finetune": {"head_learning_rate": -1.0}},
     "domains.legal.finetune: learning_rate and head_learning_rate must be >= 0 (0: that part stays as it starts)"),
    ({"finetune": {"seeds": [0, -1]}},
     "domains.legal.finetune: seeds and small_fraction_seeds must be in [0, 4294967296)"),
    ({"finetune": {"small_fraction": 2.0}}, "domains.legal.finetune.small_fraction: must be a fraction in [0, 1]"),
    ({"pretrain": {"learning_rate": -0.002}},
     "domains.legal.pretrain: learning_rate must be positive and weight_decay >= 0"),
    ({"pretrain": {"seed": 2**32}}, "domains.legal.pretrain.seed: must be in [0, 4294967296)"),
    ({"pretrain": {"keep_candidates": 0}}, "domains.legal.pretrain.keep_candidates: must be at least 1"),
])
def test_absurd_numbers_are_refused_in_one_line(
        tiny_project: Path, capsys: pytest.CaptureFixture[str], overrides: dict, line: str) -> None:
    write_params(tiny_project, tiny_params(**overrides))
    assert refusal(tiny_project, capsys) == f"error: params.yaml {line}"
