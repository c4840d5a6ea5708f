"""A long training task under a Prefect server, a process work pool and a worker, as deployed nightly,
with no network (tests/network_block.py: every non-local connection attempt of every process fails
and is recorded; none may happen).

While pretrain trains, the run must stay Running past the zombie automation's window (it never
takes a healthy run for dead). Then the worker is killed with everything under
it, as a lost machine would be: the automation marks the run Crashed, a restarted worker runs
the next flow run, and pretrain resumes from its last checkpoint instead of from scratch.

The default is sized for CI: heartbeats every 30 s (Prefect's floor), a 90 s automation window,
a healthy stretch of 100 s (past the window, at least three beats). `SSL_PIPELINE_LONG_RUN_S=1800`
keeps the run healthy for 30 minutes with Prefect's default heartbeat of 180 s (window 540 s), as
BENCHMARKS.md records. Pretrain follows a wsd plan longer than any of these, which the next run
cuts short after the kill (the checkpoint is one of the shorter plan too), so no step rate has to
be guessed from a machine whose other cores are busy with other tests.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import (
    REPO,
    SCRIPTS,
    copy_project_code,
    stage_env,
    tiny_params,
    wait_for,
    write_params,
    wsd_plan_resuming,
)
from tests.network_block import blocked_env

LONG_RUN_S = int(os.environ.get("SSL_PIPELINE_LONG_RUN_S", "0"))
HEARTBEAT_S = 180 if LONG_RUN_S else 30
HEALTHY_S = LONG_RUN_S or 3 * HEARTBEAT_S + 10  # past the automation's window
POOL = "ssl-test-pool"
WARMUP = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_wait = functools.partial(wait_for, every=1.0)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it (the flow run starts in a session of its own)."""
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(process.pid)
        tree = [top, *top.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(tree, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect server of its own (as `prefect server start` on the scheduling machine) and its env."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**stage_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_UI_ENABLED": "false", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    # no network for any process of the module: the server, the CLI, workers, flow runs, DVC, stages
    env, attempts = blocked_env(env, home, REPO)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([str(SCRIPTS / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30)

    def healthy() -> bool:
        assert process.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            return api.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait("the Prefect server", healthy, 180)
        yield {"env": env, "api": api, "home": home, "attempts": attempts}
    finally:
        api.close()
        _kill_tree(process)
        log.close()


def _state(api: httpx.Client, run_id: str) -> dict:
    return api.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]


def _heartbeats(api: httpx.Client, run_id: str) -> int:
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 50}
    return api.post("/events/filter", json=body).raise_for_status().json()["total"]


def _last_heartbeat(api: httpx.Client, run_id: str) -> float:
    """When the run's last heartbeat happened (seconds since the epoch)."""
    from datetime import datetime

    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}, "order": "DESC"}, "limit": 1}
    events = api.post("/events/filter", json=body).raise_for_status().json()["events"]
    return datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00")).timestamp()


def _checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (folder / "models/legal/checkpoints").glob("step_*.pt"))


@pytest.mark.slow
def test_a_long_pretrain_under_a_worker_stays_running_and_a_lost_worker_resumes_from_its_checkpoint(
        server: dict, tmp_path: Path) -> None:
    env, api = server["env"], server["api"]
    folder = tmp_path / "project"
    folder.mkdir()
    # a wsd plan far longer than the test (`steps` is not part of a checkpoint's identity under
    # wsd), cut short after the kill so that the resumed run ends soon, whatever the step rate
    steps = 10_000_000
    params = tiny_params(model={"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 256,
                                "max_length": 32},
                         pretrain={"batch_size": 32, "schedule": "wsd", "steps": steps, "warmup_steps": WARMUP,
                                   "checkpoint_every": 40, "seed": 11},
                         finetune={"label_fractions": [1.0], "seeds": [0], "protocols": ["linear", "finetune"]})
    write_params(folder, params)
    copy_project_code(folder)
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)

    for _ in range(2):  # deploying again updates the deployment and its automation, adds neither
        deployed = subprocess.run([sys.executable, "-m", "flows.pipeline", "--deploy", POOL, "--name", "nightly",
                                   "--domain", "legal"], cwd=folder, env=env, capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
    deployment = api.get("/deployments/name/ssl-pipeline/nightly").raise_for_status().json()
    assert len(api.post("/deployments/filter", json={}).raise_for_status().json()) == 1
    assert api.get(f"/work_pools/{POOL}").raise_for_status().json()["type"] == "process"  # --deploy made it
    assert deployment["global_concurrency_limit"]["limit"] == 1  # one run at a time
    assert deployment["parameters"] == {"domains": ["legal"], "root": str(folder.resolve())}
    automations = api.post("/automations/filter", json={}).raise_for_status().json()
    zombie = [a for a in automations if a["name"] == "ssl-pipeline/nightly: crash runs without heartbeats"]
    assert len(zombie) == 1 and zombie[0]["trigger"]["within"] == 3 * HEARTBEAT_S
    assert f"prefect.deployment.{deployment['id']}" in json.dumps(zombie[0]["trigger"]["match_related"])

    def start_worker(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - the child keeps it
        # at a lower priority (nice 10, inherited by the flow run and the trainer): the training
        # takes what the other tests leave of the cores, and the run's heartbeats must still arrive
        return subprocess.Popen(["nice", "-n", "10", str(SCRIPTS / "prefect"), "worker", "start", "--pool", POOL,
                                 "--name", name],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    worker = start_worker("first")
    try:
        run_id = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).raise_for_status().json()["id"]
        _wait("pretrain's first checkpoint", lambda: _checkpoint_steps(folder), 600)
        training_since = time.monotonic()
        while time.monotonic() - training_since < HEALTHY_S:  # healthy: Running all along, beats arriving
            state = _state(api, run_id)
            assert state["type"] == "RUNNING", (state, (tmp_path / "first.log").read_text()[-3000:])
            time.sleep(2)
        beats = _heartbeats(api, run_id)
        assert beats >= HEALTHY_S // HEARTBEAT_S, beats
        done_at_kill = _checkpoint_steps(folder)[-1]
    finally:
        _kill_tree(worker)  # the machine is gone: worker, flow run, DVC and the trainer with it
    assert 0 < done_at_kill and not (folder / "models/legal/pretrain/encoder").exists(), done_at_kill
    # the next nightly run's plan ends a little after the newest checkpoint (it resumes from there)
    steps = wsd_plan_resuming(_checkpoint_steps(folder)[-1], WARMUP)
    params["domains"]["legal"]["pretrain"]["steps"] = steps
    write_params(folder, params)

    crashed = _wait("the automation to mark the run Crashed",
                    lambda: (s := _state(api, run_id))["type"] == "CRASHED" and s, 3 * HEARTBEAT_S + 120, every=3)
    assert "no heartbeat" in crashed["message"]
    history = api.get("/flow_run_states/", params={"flow_run_id": run_id}).raise_for_status().json()
    assert [s["type"] for s in history].count("CRASHED") == 1  # only once, after the kill

    worker = start_worker("second")
    try:
        rerun_id = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).raise_for_status().json()["id"]
        final = _wait("the next flow run to finish",
                      lambda: (s := _state(api, rerun_id))["type"] in ("COMPLETED", "FAILED", "CRASHED") and s,
                      900, every=3)
        output = (tmp_path / "second.log").read_text()
        assert final["type"] == "COMPLETED", output[-3000:]
        resumed = re.search(r"resuming legal pretraining from step (\d+)", output)
        assert resumed and int(resumed.group(1)) >= done_at_kill, output[-3000:]
        log = yaml.safe_load((folder / "models/legal/pretrain/log.json").read_text())
        assert log["checkpoints"][-1]["step"] == steps
        # a window (and a margin) past its last beat: a finished run is left alone
        time.sleep(max(0.0, _last_heartbeat(api, rerun_id) + 3 * HEARTBEAT_S + 15 - time.time()))
        assert _state(api, rerun_id)["type"] == "COMPLETED"
        # the whole pipeline ran (report included) and no process of it tried the network
        assert (folder / "reports/legal/report/report.md").exists()
        assert server["attempts"].read_text() == ""
    finally:
        _kill_tree(worker)


@pytest.mark.slow
def test_serve_registers_its_deployment_with_the_same_automation(server: dict, tmp_path: Path) -> None:
    env, api = server["env"], server["api"]
    write_params(tmp_path, tiny_params())
    serving = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--serve", "--name", "served"], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    name = "ssl-pipeline/served: crash runs without heartbeats"
    try:
        def registered():
            assert serving.poll() is None, "--serve exited"
            automations = api.post("/automations/filter", json={}).raise_for_status().json()
            return [a for a in automations if a["name"] == name]
        zombie = _wait("the served deployment's automation", registered, 120)
        deployment = api.get("/deployments/name/ssl-pipeline/served").raise_for_status().json()
    finally:
        _kill_tree(serving)
    assert len(zombie) == 1 and zombie[0]["trigger"]["within"] == 3 * HEARTBEAT_S
    assert f"prefect.deployment.{deployment['id']}" in json.dumps(zombie[0]["trigger"]["match_related"])
    assert deployment["parameters"]["root"] == str(tmp_path.resolve())
