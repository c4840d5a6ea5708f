"""The nightly deployment on a Prefect work pool, and the zombie-run automation that goes with it.

    python -m flows.pipeline --deploy ssl-nightly --cron "0 2 * * *"
    prefect worker start --pool ssl-nightly

`--deploy` creates the process work pool when there is none, from the process worker's own job
template: `prefect work-pool create` makes the Prefect server fetch its worker registry from
raw.githubusercontent.com (it falls back to a bundled copy when that fails), a connection a site
without internet access should not see attempted.

Every flow run sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by
default) from a thread of its own; training runs in a process DVC starts, so it never starves
that thread. The automation installed here marks a run of this deployment Crashed only after
`HEARTBEAT_MISSES` beats in a row went missing (the machine or container is gone; Prefect #16459,
#18653): a long healthy run is never marked. A crashed run costs nothing but the next run: DVC
sees pretrain's stage unfinished and the stage resumes from its last checkpoint.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.pipeline import FLOW_NAME, pipeline

HEARTBEAT_MISSES = 3  # missed beats in a row before a run is taken for dead
DEFAULT_HEARTBEAT_S = 180


def heartbeat_frequency() -> int:
    """The heartbeat interval flow runs will use: Prefect's setting (validated >= 30 s), or the
    default where a user turned heartbeats off (the automation needs them)."""
    from prefect.settings import get_current_settings

    value = get_current_settings().flows.heartbeat_frequency
    return DEFAULT_HEARTBEAT_S if value is None else value


def zombie_automation(deployment_id: UUID, deployment_name: str, heartbeat_s: int) -> Any:
    """Prefect's documented zombie-flow automation, limited to this deployment's runs."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = HEARTBEAT_MISSES * heartbeat_s
    return Automation(
        name=f"{FLOW_NAME}/{deployment_name}: crash runs without heartbeats",
        description=f"A run of {FLOW_NAME}/{deployment_name} with no heartbeat for {within} s "
                    f"({HEARTBEAT_MISSES} beats of {heartbeat_s} s) is marked Crashed; the next run resumes it.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within} s: the machine or the worker is gone")],
    )


def install_zombie_automation(deployment_id: UUID, deployment_name: str, heartbeat_s: int) -> Any:
    """Create the automation, or bring an existing one of the same name up to date."""
    from prefect.automations import Automation

    wanted = zombie_automation(deployment_id, deployment_name, heartbeat_s)
    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:  # not there yet
        return wanted.create()
    for field in ("description", "trigger", "actions", "enabled"):
        setattr(existing, field, getattr(wanted, field))
    existing.update()
    return existing


def ensure_process_pool(pool: str) -> bool:
    """Create work pool `pool` of type `process` unless a pool of that name exists; True if created.

    The job template is the process worker's own (what `prefect work-pool create --type process`
    installs), read locally: no request to Prefect's collection registry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def deploy(pool: str, *, name: str = "nightly", cron: str | None = "0 2 * * *", domains: list[str] | None = None,
           root: Path | None = None) -> UUID:
    """Register the flow from this project folder on a process work pool (created if there is
    none); returns the deployment id.

    One run at a time (`concurrency_limit=1`); the flow run's environment carries the heartbeat
    interval the automation was sized for.
    """
    root = (root or Path.cwd()).resolve()
    heartbeat_s = heartbeat_frequency()
    ensure_process_pool(pool)
    deployment_id = pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:pipeline").deploy(
        name=name, work_pool_name=pool, cron=cron, concurrency_limit=1, build=False, push=False,
        parameters={"domains": domains, "root": str(root)}, print_next_steps=False,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}})
    install_zombie_automation(deployment_id, name, heartbeat_s)
    return deployment_id


def serve(*, name: str = "nightly", cron: str | None = "0 2 * * *", domains: list[str] | None = None,
          root: Path | None = None) -> None:
    """Run the deployment in this process (no work pool), with the same zombie automation."""
    from prefect import serve as prefect_serve

    root = (root or Path.cwd()).resolve()
    heartbeat_s = heartbeat_frequency()
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(heartbeat_s)  # the served runs inherit it
    deployment = pipeline.to_deployment(name=name, cron=cron, concurrency_limit=1,
                                        parameters={"domains": domains, "root": str(root)})
    install_zombie_automation(deployment.apply(), name, heartbeat_s)
    prefect_serve(deployment)
