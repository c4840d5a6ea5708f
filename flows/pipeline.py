"""The Prefect flow: run every domain's DVC stages in order, publish each report as an artifact.

DVC is the one cache: each Prefect task asks DVC to reproduce one stage (`stage@domain`),
and DVC runs it only when its deps or params changed. A re-run with nothing changed
executes no stage. Prefect adds retries, run history, schedules and artifacts.

    python -m flows.pipeline                       # run once (temporary local Prefect server)
    python -m flows.pipeline --serve --cron "0 2 * * *"   # a deployment that runs nightly
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from ssl_models.core.offline import apply_offline_env  # noqa: E402

apply_offline_env()  # before Prefect reads its settings
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from ssl_models.core.config import load_params  # noqa: E402
from tasks.cli import STAGES  # noqa: E402
from tasks.lineage import PREFECT_RUN_ENV  # noqa: E402
from tasks.paths import DomainPaths  # noqa: E402


def _stage_environment() -> None:
    """Offline settings for the stage commands DVC starts, the venv's scripts on PATH, and
    the flow run id for lineage records."""
    apply_offline_env()
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    if flow_run.id:
        os.environ[PREFECT_RUN_ENV] = str(flow_run.id)


@task(retries=1, retry_delay_seconds=5, task_run_name="{stage}@{domain}")
def run_stage(stage: str, domain: str, root: str) -> bool:
    """Reproduce one DVC stage if it is stale; True when it ran."""
    from dvc.repo import Repo

    _stage_environment()
    logging.getLogger("dvc").propagate = False  # DVC prints its own lines; no second copy via Prefect
    # DVC resolves some output paths against the working directory, so work from the root.
    with contextlib.chdir(root), Repo(".") as repo:
        reproduced = repo.reproduce(f"{stage}@{domain}", single_item=True)
    ran = bool(reproduced)
    get_run_logger().info("%s@%s: %s", stage, domain, "ran" if ran else "up to date, skipped")
    return ran


@task
def publish_report(domain: str, root: str) -> None:
    report = DomainPaths(domain, Path(root)).report / "report.md"
    create_markdown_artifact(key=f"{domain.replace('_', '-')}-report", markdown=report.read_text(),
                             description=f"Domain pretraining report: {domain}")


@flow(name="ssl-pipeline")
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
    parser.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead")
    parser.add_argument("--cron", default="0 2 * * *", help="schedule for --serve (default: 02:00 daily)")
    args = parser.parse_args(argv)
    if args.serve:
        pipeline.serve(name="nightly", cron=args.cron, parameters={"domains": args.domain, "root": os.getcwd()})
        return 0
    pipeline(domains=args.domain, root=".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
