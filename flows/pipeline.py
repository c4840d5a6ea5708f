"""The Prefect flow: run every domain's DVC stages in order, publish each report as an artifact.

DVC is the one cache: each Prefect task asks DVC to reproduce one stage (`stage@domain`),
and DVC runs it only when its deps or params changed. A re-run with nothing changed
executes no stage. Prefect adds retries, run history, schedules and artifacts.

    python -m flows.pipeline                       # run once (temporary local Prefect server)
    python -m flows.pipeline --serve --cron "0 2 * * *"   # a deployment that runs nightly

Failures and retries: a stage that stops on bad input or configuration (the CLI's exit status 2,
a `PipelineError`) fails its task at once, never retried: the same input would fail the same way.
Anything else (a crash, exit status 1; the domain's lock still held after the wait, 75; DVC's own
lock held by another `dvc` process) is retried twice. A retry, and any later flow run, asks DVC
again: nothing is cached on Prefect's side (`NO_CACHE`), so a stage that failed or was killed is
re-run, and pretrain picks up from its last checkpoint (`models/<domain>/checkpoints`, local state DVC does not track, persists).

Long runs: no task has a timeout, and the stage works in a process of its own (DVC starts the
CLI), so the flow's heartbeat thread (every PREFECT_FLOWS_HEARTBEAT_FREQUENCY s, default 180) is
never starved by training. `--deploy POOL` (a process work pool) and `--serve` install a zombie-run
automation (flows/deployment.py) that marks a run Crashed only after 3 missed beats (Prefect #16459,
#18653); a crashed run is not retried by Prefect itself, and the next scheduled run (or
`prefect deployment run ssl-pipeline/nightly`) resumes it from the last checkpoint.

A cancel stops the work: SIGTERM or SIGINT to the flow process, or a cancel from the UI (the
worker's runner sends the flow run SIGTERM; Prefect's handler raises in the flow and records the
run Cancelled, or Crashed for a bare SIGTERM) stops the stage processes the running task started
(each forwards it to everything under it and releases its domain's lock), the task is not
retried, and the flow ends: exit status 143 (SIGTERM) or 130 (SIGINT) and one line, `cancelled:`.
The temporary Prefect server is stopped on the way out, then anything still under the flow. A
stage exiting 143 or 130 (cancelled on its own) is not retried either.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ssl_models.core.offline import apply_offline_env  # noqa: E402

apply_offline_env()  # before Prefect reads its settings
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from ssl_models.core.config import load_params  # noqa: E402
from ssl_models.core.errors import PipelineError  # noqa: E402
from tasks.cli import (  # noqa: E402
    EXIT_BAD_INPUT,
    STAGES,
    STOP_GRACE_SECONDS,
    cancellable,
    descendants,
    printable,
    stop_processes,
)
from tasks.lineage import PREFECT_RUN_ENV  # noqa: E402
from tasks.paths import DomainPaths  # noqa: E402

FLOW_NAME = "ssl-pipeline"
CANCELLED_EXITS = (128 + 2, 128 + 15)  # a stage that stopped on SIGINT or SIGTERM (tasks/cli.py)
# seconds a stage gets to stop after the flow's SIGTERM (it stops what it started first) before SIGKILL
STAGE_STOP_GRACE_SECONDS = 4 * STOP_GRACE_SECONDS


def _stage_environment() -> None:
    """Offline settings for the stage commands DVC starts, the venv's scripts on PATH, and
    the flow run id for lineage records."""
    apply_offline_env()
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    if flow_run.id:
        os.environ[PREFECT_RUN_ENV] = str(flow_run.id)


def stage_exit_status(error: BaseException) -> int | None:
    """The exit status of the stage command behind a DVC reproduction error, when there is one."""
    from dvc.stage.exceptions import StageCmdFailedError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StageCmdFailedError):
            found = re.search(r"exited with (-?\d+)", str(seen))
            return int(found.group(1)) if found else None
        seen = seen.__cause__ or seen.__context__
    return None


def _stage_error_line(stage: str, domain: str, root: str) -> str:
    """The one line the CLI printed for the stage's last failure (it also keeps it in a file)."""
    path = Path(root) / ".ssl-pipeline" / "logs" / f"{stage}-{domain}.error"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return "its message is in the stage's output above"


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: a configuration or data error is never retried."""
    try:
        state.result()
    except PipelineError:
        return False
    except BaseException:  # noqa: BLE001 - any other failure keeps its retries
        return True
    return True


def reproduce_stoppably(reproduce: Callable[[], Any]) -> Any:
    """`reproduce()` (DVC running a stage command) in a thread of its own, while this one waits:
    DVC ignores SIGINT in the main thread while a stage runs, which would leave the flow deaf to
    it. When the wait ends on a signal (Prefect's SIGTERM handler, the UI's cancel, SIGINT), the
    processes DVC started are stopped before the exception goes on, so no stage outlives its task."""
    from concurrent.futures import ThreadPoolExecutor

    already = set(descendants())  # the temporary Prefect server, when there is one
    with ThreadPoolExecutor(1, thread_name_prefix="dvc-reproduce") as running:
        try:
            return running.submit(reproduce).result()
        except BaseException:
            stop_processes([p for p in descendants() if p not in already], grace=STAGE_STOP_GRACE_SECONDS)
            raise  # once DVC's thread has ended (the pool's exit waits for it): its lock is free


# No timeout: a pretraining stage runs for hours. Retries re-run the DVC stage, never a cached state.
@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_bad_input,
      cache_policy=NO_CACHE, timeout_seconds=None, task_run_name="{stage}@{domain}")
def run_stage(stage: str, domain: str, root: str) -> bool:
    """Reproduce one DVC stage if it is stale; True when it ran."""
    from dvc.exceptions import NotDvcRepoError, ReproductionError, StageNotFoundError
    from dvc.parsing import ResolveError
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound
    from dvc.utils.strictyaml import YAMLSyntaxError, YAMLValidationError

    # the project's own description is wrong (dvc.yaml, params.yaml, no such stage): fix, do not retry
    description_errors = (NotDvcRepoError, StageNotFoundError, StageNotFound, ResolveError, YAMLSyntaxError,
                          YAMLValidationError)

    _stage_environment()
    logging.getLogger("dvc").propagate = False  # DVC prints its own lines; no second copy via Prefect

    def reproduce() -> list:
        # DVC resolves some output paths against the working directory, so work from the root.
        with contextlib.chdir(root), Repo(".") as repo:
            return repo.reproduce(f"{stage}@{domain}", single_item=True)

    try:
        reproduced = reproduce_stoppably(reproduce)
    except ReproductionError as error:
        status = stage_exit_status(error)
        if status == EXIT_BAD_INPUT:  # the CLI's PipelineError: fix, do not retry
            raise PipelineError(f"{stage}@{domain} stopped on bad input or configuration (not retried): "
                                f"{_stage_error_line(stage, domain, root)}") from None
        if status in CANCELLED_EXITS:  # someone cancelled the stage itself: not undone by a retry
            raise PipelineError(f"{stage}@{domain} was cancelled (exit status {status}; not retried): "
                                f"{_stage_error_line(stage, domain, root)}") from None
        raise
    except description_errors as error:
        raise PipelineError(f"{stage}@{domain}: DVC cannot run it (not retried): {' '.join(str(error).split())}") from None
    ran = bool(reproduced)
    get_run_logger().info("%s@%s: %s", stage, domain, "ran" if ran else "up to date, skipped")
    return ran


def report_artifacts(domain: str, root: str) -> dict[str, Any]:
    """What publish_report hands Prefect, as keyword arguments per call (`markdown`, `table`, `links`),
    built without Prefect. Prefect renders descriptions, link texts and the report as Markdown: the
    report's values are escaped by its templates, the domain's name here (`markdown_text`), and the
    links are file URIs (percent-encoded); keys are the domain's name as a slug."""
    from slugify import slugify  # python-slugify, Prefect's own dependency

    from tasks.stages.report import markdown_text, verdict_table

    paths = DomainPaths(domain, Path(root))
    key = slugify(domain)  # Prefect takes lowercase letters, digits and dashes only: `legal_text` -> `legal-text`
    name = markdown_text(domain)
    metrics = json.loads(paths.metrics.read_text())
    comparisons = json.loads((paths.evaluation / "comparisons.json").read_text())
    return {
        "markdown": {"key": f"{key}-report", "markdown": (paths.report / "report.md").read_text(),
                     "description": f"Domain pretraining report: {name}"},
        "table": {"key": f"{key}-verdict", "table": verdict_table(metrics, comparisons),
                  "description": f"{name}: ssl against each alternative, {metrics['primary_metric']}, "
                                 f"paired {metrics.get('confidence', 0.95):.0%} intervals"},
        "links": [{"key": f"{key}-report-html", "link": (paths.report / "report.html").resolve().as_uri(),
                   "link_text": f"{name} report (HTML)", "description": "The report page on the machine that ran it"},
                  {"key": f"{key}-export", "link": paths.export.resolve().as_uri(),
                   "link_text": f"{name} encoder export (model card: README.md)",
                   "description": "The encoder in its field's format, on the machine that ran it"}]}


@task
def publish_report(domain: str, root: str) -> None:
    """The report as a Markdown artifact, the verdict as a table artifact, links to the HTML report and the export."""
    artifacts = report_artifacts(domain, root)
    create_markdown_artifact(**artifacts["markdown"])
    create_table_artifact(**artifacts["table"])
    for link in artifacts["links"]:
        create_link_artifact(**link)


@flow(name=FLOW_NAME)
def pipeline(domains: list[str] | None = None, root: str = ".") -> dict[str, bool]:
    """Every stage of every domain (or of `domains`), in order; returns which stages ran."""
    logger = get_run_logger()
    names = domains or list((load_params(Path(root) / "params.yaml").get("domains") or {}))
    executed: dict[str, bool] = {}
    failed: list[str] = []
    for domain in names:
        try:
            for stage in STAGES:
                executed[f"{stage}@{domain}"] = run_stage(stage, domain, root)
            publish_report(domain, root)
        except Exception as error:  # one domain's failure must not stop the others
            logger.error("domain %s failed: %s", domain, error)
            failed.append(domain)
    ran = [name for name, did in executed.items() if did]
    logger.info("stages run: %s", ", ".join(ran) if ran else "none (everything up to date)")
    if failed:
        raise RuntimeError(f"domains failed: {failed}; see the task logs")
    return executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the pipeline as a Prefect flow.")
    parser.add_argument("--domain", action="append", help="only this domain (repeatable)")
    parser.add_argument("--serve", action="store_true", help="serve a scheduled deployment from this process")
    parser.add_argument("--deploy", metavar="POOL", help="register a scheduled deployment on a process work pool")
    parser.add_argument("--name", default="nightly", help="deployment name for --serve / --deploy")
    parser.add_argument("--cron", default="0 2 * * *", help="schedule for --serve / --deploy (default: 02:00 daily)")
    args = parser.parse_args(argv)
    if args.deploy:
        from flows.deployment import deploy

        deployment_id = deploy(args.deploy, name=args.name, cron=args.cron, domains=args.domain)
        print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}) on work pool {args.deploy!r}; "
              f"start a worker with: prefect worker start --pool {args.deploy}")
        return 0
    # after the temporary server's own stop (atexit runs the last registered first): what is left under the flow
    atexit.register(lambda: stop_processes(descendants()))
    # SIGINT, and SIGTERM once Prefect's handler has recorded the run (it passes SIGTERM on to this one)
    with cancellable(forward=False) as cancel:
        try:
            if args.serve:
                from flows.deployment import serve

                serve(name=args.name, cron=args.cron, domains=args.domain)
            else:
                pipeline(domains=args.domain, root=".")
        except KeyboardInterrupt as error:  # Cancelled included
            cancel.armed = False
            signum = cancel.signum or getattr(error, "signum", 2)
            print(printable(f"cancelled: the flow stopped on {signal.Signals(signum).name}, with the stage it "
                            "was running; run it again to go on (pretrain resumes from its last checkpoint)"),
                  file=sys.stderr)
            return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
