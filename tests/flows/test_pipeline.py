"""The whole spine on a tiny real corpus, through the Prefect flow and through `dvc repro`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_models.core.errors import PipelineError
from tasks.cli import STAGES
from tasks.lineage import read_run_record
from tests.conftest import SCRIPTS, copy_project_code, stage_env, tiny_params, write_params

def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=folder, capture_output=True, text=True,
                          env=stage_env())


# conftest.worker_group keeps this module's tests together in one worker: the server and the
# spine are made once
@pytest.fixture(scope="module")
def prefect_server():
    """One temporary Prefect server (and database) for the module's flow runs (~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> dict:
    """Run the flow twice on a fresh project; keep what each run executed."""
    from flows.pipeline import pipeline

    folder = tmp_path_factory.mktemp("project")
    write_params(folder, tiny_params())
    copy_project_code(folder)
    first = pipeline(root=str(folder))
    second = pipeline(root=str(folder))
    return {"folder": folder, "first": first, "second": second}


@pytest.mark.slow
def test_flow_runs_every_stage_then_none(spine: dict) -> None:
    assert spine["first"] == {f"{s}@legal": True for s in STAGES}
    assert spine["second"] == {f"{s}@legal": False for s in STAGES}


@pytest.mark.slow
def test_report_metrics_schema_and_lineage(spine: dict) -> None:
    folder = spine["folder"]
    metrics = yaml.safe_load((folder / "reports/legal/metrics.json").read_text())
    assert metrics["domain"] == "legal" and metrics["primary_metric"] == "macro_f1"
    keys = {(r["init"], r["protocol"], r["label_fraction"]) for r in metrics["results"] if r["metric"] == "macro_f1"}
    assert keys == ({(i, p, f) for i in ("ssl", "scratch") for p in ("linear", "knn", "finetune") for f in (0.1, 1.0)}
                    | {("baseline", "linear", f) for f in (0.1, 1.0)})  # the TF-IDF baseline: a linear probe
    assert all(r["n_seeds"] == 3 and 0 <= r["mean"] <= 1 for r in metrics["results"])
    report = (folder / "reports/legal/report/report.md").read_text()
    assert "## Verdict" in report and "10% of labels" in report and "raw corpus" in report
    assert (folder / "reports/legal/report/label_efficiency.png").stat().st_size > 10_000
    run = read_run_record(folder / "models/legal/finetune")  # times and run ids: beside the artifact
    assert run["prefect_flow_run_id"] and run["code"]["commit"]
    assert "prefect_flow_run_id" not in yaml.safe_load((folder / "models/legal/finetune/lineage.json").read_text())
    # the flow published the verdict as a table and a link to the HTML report
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        published = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=["legal-verdict", "legal-report-html", "legal-export"])))}
    table = published["legal-verdict"].data
    table = json.loads(table) if isinstance(table, str) else table
    comparisons = yaml.safe_load((folder / "reports/legal/evaluation/comparisons.json").read_text())
    best = [c for c in comparisons if c["protocol"] == "best"]
    assert {(r["label_fraction"], r["against"]) for r in table} == {(0.1, a) for a in ("baseline", "scratch")} | {
        (1.0, a) for a in ("baseline", "scratch")} == {(c["label_fraction"], c["against"]) for c in best}
    for row in table:
        c = next(c for c in best if (c["label_fraction"], c["against"]) == (row["label_fraction"], row["against"]))
        assert (row["difference"], row["interval"], row["verdict"]) == (c["mean_difference"], c["interval"],
                                                                       c["verdict"])
    link = published["legal-report-html"].data  # Prefect keeps a link as Markdown: [text](url)
    assert f"({(folder / 'reports/legal/report/report.html').resolve().as_uri()})" in link
    assert f"({(folder / 'models/legal/export').resolve().as_uri()})" in published["legal-export"].data
    assert (folder / "models/legal/export/README.md").is_file()  # the flow ran the export stage
    verified = subprocess.run([str(SCRIPTS / "ssl-pipeline"), "lineage", "verify", "reports/legal/report"],
                              cwd=folder, capture_output=True, text=True, env=stage_env())
    assert verified.returncode == 0, verified.stdout


@pytest.mark.slow
def test_dvc_is_up_to_date_and_a_finetune_param_reruns_only_downstream(spine: dict) -> None:
    folder = spine["folder"]
    repro = dvc(folder, "repro")
    assert repro.returncode == 0 and "Running stage" not in repro.stdout
    assert dvc(folder, "metrics", "show").returncode == 0
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["domains"]["legal"]["finetune"]["max_steps"] = 4
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = dvc(folder, "repro")
    assert repro.returncode == 0, repro.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", repro.stdout))
    assert ran == {"finetune@legal", "evaluate@legal", "report@legal", "export@legal"}  # the card carries the numbers


def test_a_bad_input_failure_is_never_retried_and_any_other_keeps_its_retries() -> None:
    from dvc.exceptions import ReproductionError
    from dvc.stage.exceptions import StageCmdFailedError
    from prefect.states import Failed

    from flows.pipeline import retry_unless_bad_input, run_stage, stage_exit_status

    assert retry_unless_bad_input(None, None, Failed(data=PipelineError("labels.csv: not UTF-8"))) is False
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("CUDA error: unspecified launch failure")))
    assert run_stage.retries >= 1 and run_stage.timeout_seconds is None
    for status in (2, 1, 75):
        try:
            try:
                raise StageCmdFailedError("ssl-pipeline ingest legal", status)
            except StageCmdFailedError as cause:
                raise ReproductionError("failed to reproduce 'ingest@legal'") from cause
        except ReproductionError as error:
            assert stage_exit_status(error) == status
    assert stage_exit_status(RuntimeError("no stage behind it")) is None


@pytest.mark.slow
def test_a_stage_that_exits_on_bad_input_runs_once_and_a_crashing_one_is_retried(tmp_path: Path,
                                                                                 prefect_server: None) -> None:
    """Through Prefect and DVC: a stage command exiting 2 is tried once, one exiting 1 three times."""
    from prefect import flow

    from flows.pipeline import run_stage

    (tmp_path / "params.yaml").write_text("domains:\n  bad: {status: 2}\n  crash: {status: 1}\n")
    command = (f"{sys.executable} -c \"import sys; open('tries-${{key}}', 'a').write('x'); "
               "print('error: labels.csv is not UTF-8', file=sys.stderr); sys.exit(${item.status})\"")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"ingest": {"foreach": "${domains}", "do": {"cmd": command, "outs": ["out-${key}"]}}}}))
    for command in (["git", "init", "-q"], [str(SCRIPTS / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True, env=stage_env())
    quick = run_stage.with_options(retry_delay_seconds=0)

    @flow
    def one(domain: str) -> str:
        state = quick("ingest", domain, str(tmp_path), return_state=True)
        return type(state.result(raise_on_failure=False)).__name__

    assert one("bad") == "PipelineError"
    assert one("crash") == "ReproductionError"
    assert one("missing") == "PipelineError"  # no such stage in dvc.yaml: not retried either
    assert (tmp_path / "tries-bad").read_text() == "x"
    assert (tmp_path / "tries-crash").read_text() == "x" * (1 + run_stage.retries)
