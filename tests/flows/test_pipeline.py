"""The whole spine on a tiny real corpus, through the Prefect flow and through `dvc repro`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.cli import STAGES
from tasks.lineage import read_run_record
from tests.conftest import SCRIPTS, copy_project_code, stage_env, tiny_params, write_params

pytestmark = pytest.mark.slow



def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=folder, capture_output=True, text=True,
                          env=stage_env())


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the flow twice on a fresh project; keep what each run executed."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    folder = tmp_path_factory.mktemp("project")
    write_params(folder, tiny_params())
    copy_project_code(folder)
    with prefect_test_harness():
        first = pipeline(root=str(folder))
        second = pipeline(root=str(folder))
    return {"folder": folder, "first": first, "second": second}


def test_flow_runs_every_stage_then_none(spine: dict) -> None:
    assert spine["first"] == {f"{s}@legal": True for s in STAGES}
    assert spine["second"] == {f"{s}@legal": False for s in STAGES}


def test_report_metrics_schema_and_lineage(spine: dict) -> None:
    folder = spine["folder"]
    metrics = yaml.safe_load((folder / "reports/legal/metrics.json").read_text())
    assert metrics["domain"] == "legal" and metrics["primary_metric"] == "macro_f1"
    keys = {(r["init"], r["protocol"], r["label_fraction"]) for r in metrics["results"] if r["metric"] == "macro_f1"}
    assert keys == {(i, p, f) for i in ("ssl", "scratch") for p in ("linear", "knn", "finetune") for f in (0.1, 1.0)}
    assert all(r["n_seeds"] == 3 and 0 <= r["mean"] <= 1 for r in metrics["results"])
    report = (folder / "reports/legal/report/report.md").read_text()
    assert "## Verdict" in report and "10% of labels" in report and "raw corpus" in report
    assert (folder / "reports/legal/report/label_efficiency.png").stat().st_size > 10_000
    run = read_run_record(folder / "models/legal/finetune")  # times and run ids: beside the artifact
    assert run["prefect_flow_run_id"] and run["code"]["commit"]
    assert "prefect_flow_run_id" not in yaml.safe_load((folder / "models/legal/finetune/lineage.json").read_text())
    verified = subprocess.run([str(SCRIPTS / "ssl-pipeline"), "lineage", "verify", "reports/legal/report"],
                              cwd=folder, capture_output=True, text=True, env=stage_env())
    assert verified.returncode == 0, verified.stdout


def test_dvc_is_up_to_date_and_a_finetune_param_reruns_only_downstream(spine: dict) -> None:
    folder = spine["folder"]
    repro = dvc(folder, "repro")
    assert repro.returncode == 0 and "Running stage" not in repro.stdout
    assert dvc(folder, "metrics", "show").returncode == 0
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["domains"]["legal"]["finetune"]["steps"] = 4
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = dvc(folder, "repro")
    assert repro.returncode == 0, repro.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", repro.stdout))
    assert ran == {"finetune@legal", "evaluate@legal", "report@legal"}
