"""Shared fixtures: a tiny real legal corpus (license texts from licensedcode-data) and a
project folder with tiny params, so the stages run in seconds; projects and reference runs built
once per session and copied where a test changes them.

The suite runs in several processes (pytest-xdist, `-n auto` in pyproject.toml: a worker per core
and one more). Each takes an equal share of the cores, at least one thread, for torch and what it
starts: two processes of 2 threads each on 2 cores spin against each other (OpenMP busy-waits)
and run several times slower than 1 thread each."""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.common import copy_project_code, stage_env  # noqa: F401  (re-exported for the tests)
from ssl_models.core.offline import apply_offline_env
from tasks.cli import STAGES, run_stage
from tests.stage_processes import StageProcesses

apply_offline_env()


def _share_the_cores() -> None:
    """In one of several xdist workers, torch (and every process the tests start, which inherit the
    environment) gets cores / workers threads, unless the caller set OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


_share_the_cores()


def _interrupt_as_from_a_terminal() -> None:
    """A suite started as a background job of a non-interactive shell (`pytest &`) inherits SIGINT
    ignored, and so would every process the tests start, which keep an ignored signal ignored (as
    under nohup): the cancel tests' Ctrl-C would reach nothing. The processes start as from a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_interrupt_as_from_a_terminal()

def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per core and one more, since the worker test spends most of its six
    minutes waiting on Prefect's heartbeat windows (PYTEST_XDIST_AUTO_NUM_WORKERS overrides)."""
    return int(os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or (os.cpu_count() or 1) + 1)


def worker_group(nodeid: str) -> str:
    """The tests that must run in one worker process, to share what it builds once (a reference
    run, a Prefect server): the kill tests of a domain and the re-run test beside their reference
    run (the export and embed tests beside theirs), the flow tests beside their
    Prefect server (each flow module its own), the two distributed pretrain tests beside their
    one-process run. Any other test is a group of its own."""
    kill = re.match(r"tests/faults/test_kills\.py::\w+\[(\w+)-\d+\]$", nodeid)
    if kill:
        return f"reference-{kill.group(1)}"
    if nodeid == "tests/test_dvc_contract.py::test_stage_outputs_are_byte_identical_when_re_run":
        return "reference-legal"
    if nodeid.startswith(("tests/tasks/test_export.py::test_the_export_stage_card",
                          "tests/tasks/test_export.py::test_a_fine_tuned_encoder_exports")):
        return "reference-legal"
    if nodeid.startswith(("tests/tasks/test_export.py::test_the_medical_export",
                          "tests/tasks/test_embed.py::test_a_medical_folder")):
        return "reference-medical"
    if nodeid.startswith("tests/tasks/test_export.py::test_the_histopathology_export"):
        return "reference-histo"
    if nodeid.startswith("tests/tasks/test_export.py::test_the_audio_export_of_a_pretrained_run"):
        return "reference-audio"
    if nodeid.startswith("tests/flows/test_pipeline.py::"):
        return "prefect-harness"
    if nodeid.startswith("tests/flows/test_worker.py::"):
        return "prefect-worker"
    if nodeid.startswith("tests/tasks/test_pretrain_distributed.py::"):
        return "one-process-pretrain"
    return nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's load scheduling over `worker_group`s. (xdist's own `xdist_group` marker does not
    group under pytest 9, whose node ids xdist can no longer rename: seen with xdist 3.8.0.)"""
    from xdist.scheduler import LoadScopeScheduling

    # the groups start in the order pytest_collection_modifyitems gives them, not largest first
    # (xdist's default), which put the worker test behind the multi-test groups (9 min, not 7.5)
    config.option.loadscopereorder = False

    class SharedWorkScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return SharedWorkScheduling(config, log)


# The tests that wait on a clock more than they compute (a Prefect server's heartbeat windows)
# start first, so the other workers fill the waits; then the groups that share a build (the
# longest units of work); then the rest, in collection order.
FIRST = ("tests/flows/test_worker.py",)


def _start_order(item: pytest.Item) -> int:
    if item.nodeid.startswith(FIRST):
        return 0
    return 1 if worker_group(item.nodeid) != item.nodeid else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_start_order)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent

TINY_LEGAL = {
    "module": "legal_text",
    "corpus": "data/legal/default/corpus",
    "labels": "data/legal/default/labels.csv",
    "cpu_threads": None,
    "preset": None,
    "presets": {"faster": {"pretrain": {"steps": 6, "checkpoint_every": 3}}},
    "privacy": {"pseudonymise": False},
    "default_data": {"max_files": 60},
    "split": {"val": 0.1, "test": 0.25, "salt": "split-v17"},  # every class of the 60 files has a train row
    "ingest": {},
    "preprocess": {"tokenizer": "train", "vocab_size": 400, "min_frequency": 2, "block_size": 32},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_length": 32},
    "pretrain": {"method": "mlm", "steps": 12, "batch_size": 8, "learning_rate": 0.002, "warmup_steps": 2,
                 "checkpoint_every": 4, "rankme_samples": 32, "seed": 0},
    "finetune": {"label_fractions": [0.1, 1.0], "seeds": [0, 1, 2], "protocols": ["linear", "knn", "finetune"],
                 "max_steps": 3, "batch_size": 8},
}


def tiny_params(**overrides: dict) -> dict:
    block = copy.deepcopy(TINY_LEGAL)
    for section, values in overrides.items():
        if isinstance(values, dict):
            block.setdefault(section, {}).update(values)
        else:
            block[section] = values
    return {"domains": {"legal": block}}


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float) -> object:
    """`check()`'s first truthy value, tried every `every` s; an AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wsd_plan_resuming(step: int, warmup: int) -> int:
    """The shortest wsd plan (with `warmup` steps) whose decay starts at or after `step`: a checkpoint
    taken there is a checkpoint of that plan too (the rate before the decay does not depend on `steps`),
    so a run cut short after a kill or a cancel resumes from it and ends soon."""
    from ssl_models.core.config import PretrainConfig
    from ssl_models.core.schedules import decay_start

    steps = step + 1
    while decay_start(PretrainConfig(steps=steps, warmup_steps=warmup, schedule="wsd")) < step:
        steps += 1
    return steps


def peaks_in_a_fresh_interpreter(folder: Path, function: str, sizes: tuple[int, int, int],
                                 settings: str = "") -> tuple[int, int]:
    """The peaks `module:name` returns for `folder/small` and `folder/large` at the last two `sizes`,
    run in a fresh interpreter after `settings` (Python lines, e.g. a smaller buffer) and one
    warm-up run at the first size: the modules a first run imports, and the interpreter's tables
    a test process has grown by then, are not what is measured."""
    import subprocess

    module, name = function.split(":")
    warm, small, large = sizes
    code = "\n".join([f"import sys; sys.path.insert(0, {str(REPO)!r})", "from pathlib import Path",
                      f"from {module} import {name}", settings,
                      f"{name}(Path({str(folder)!r}) / 'warm', {warm})",
                      f"print({name}(Path({str(folder)!r}) / 'small', {small}), "
                      f"{name}(Path({str(folder)!r}) / 'large', {large}))"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stage_env())
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = map(int, done.stdout.split()[-2:])
    return first, second


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """An empty project folder with tiny legal params (stages take it as their root)."""
    write_params(tmp_path, tiny_params())
    return tmp_path


def losses_on_one_batch(method: Any, batch: dict, steps: int, learning_rate: float) -> list[float]:
    """`method`'s loss at each of `steps` AdamW steps on the same `batch` (views and masks drawn once):
    the tests that a method learns assert that it falls."""
    import torch

    optimizer = torch.optim.AdamW(method.parameters(), lr=learning_rate)
    losses = []
    for _ in range(steps):
        loss = method(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_stages(root: Path, domain: str, *stages: str) -> list[object]:
    """Each stage in order, as the CLI runs it (params parsed and checked once per stage)."""
    return [run_stage(stage, domain, root) for stage in stages]


def copy_project(source: Path, target: Path) -> Path:
    """A writable copy of a built project folder (hidden files, the salt and run records included):
    the stages' outputs name no absolute path, so the copy is the project run in `target`."""
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    return target


@pytest.fixture(scope="session")
def built_legal(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny legal project built once per session up to a stage (`preprocess` or `pretrain`),
    read-only: tests copy it (`ingested_project`, `pretrained_project`)."""
    built: dict[str, Path] = {}

    def up_to(last: str) -> Path:
        if last not in built:
            root = tmp_path_factory.mktemp(f"built-legal-{last}")
            write_params(root, tiny_params())
            stages = STAGES[:STAGES.index(last) + 1]
            if last != "preprocess":  # start from the preprocessed build instead of again from nothing
                copy_project(up_to("preprocess"), root)
                stages = stages[STAGES.index("preprocess") + 1:]
            run_stages(root, "legal", *stages)
            built[last] = root
        return built[last]

    return up_to


@pytest.fixture
def ingested_project(built_legal: Callable[[str], Path], tmp_path: Path) -> Path:
    """tiny_project with the default data laid out, ingested and preprocessed (a copy of the
    session's build: what a test changes stays in its own folder)."""
    return copy_project(built_legal("preprocess"), tmp_path)


@pytest.fixture
def pretrained_project(built_legal: Callable[[str], Path], tmp_path: Path) -> Path:
    """ingested_project with the encoder pretrained on the tiny params (12 steps)."""
    return copy_project(built_legal("pretrain"), tmp_path)


def reference_params(domain: str) -> dict:
    """The tiny block each domain's reference run uses: a pretrain long enough to be killed
    between checkpoints, inside them and after them."""
    if domain == "legal":
        return tiny_params(pretrain={"steps": 24, "checkpoint_every": 4, "warmup_steps": 2},
                           finetune={"label_fractions": [0.1, 1.0], "seeds": [0, 1], "small_fraction_seeds": [0, 1]})
    if domain == "audio":
        from tests.ssl_models.test_audio_pipeline import audio_params as block
    elif domain == "histo":
        from tests.ssl_models.histo_files import histo_params as block
    else:
        from tests.ssl_models.medical_files import medical_params as block
    extra = ({"corpus": "data/medical/default/corpus", "labels": "data/medical/default/labels.csv"}
             if domain == "medical" else {})  # its tiny block names a test corpus: the default data here
    return block(pretrain={"steps": 12, "checkpoint_every": 3, "warmup_steps": 1}, **extra)


def output_digests(root: Path, domain: str) -> dict[str, str]:
    """SHA-256 of every file the stages wrote, except run records (times, pids: not results) and
    pretrain's checkpoints (`cache: false`: which ones are kept depends on when a run stopped)."""
    from ssl_models.core.hashing import sha256_file

    found = {}
    for base in ("data", "models", "reports"):
        for path in sorted((root / base).rglob("*")):
            relative = path.relative_to(root).as_posix()
            if not path.is_file() or path.name.endswith(".run.json") or f"{domain}/checkpoints" in relative:
                continue
            found[relative] = sha256_file(path)
    return found


@dataclass(frozen=True)
class ReferenceRun:
    """One uninterrupted run of every stage of a domain, each as the CLI runs it, in its own folder."""

    root: Path
    digests: dict[str, str]
    durations: dict[str, float]


_STAGE_PROCESSES: list[StageProcesses] = []


def shared_stage_processes() -> StageProcesses:
    """This test process' one `StageProcesses` (its forkserver imports the libraries once)."""
    if not _STAGE_PROCESSES:
        import tempfile

        _STAGE_PROCESSES.append(StageProcesses(stage_env(), Path(tempfile.mkdtemp(prefix="stage-stderr-"))))
    return _STAGE_PROCESSES[0]


@pytest.fixture(scope="session")
def stage_processes() -> StageProcesses:
    """`ssl-pipeline` commands in processes of their own, forked after the imports (see stage_processes.py)."""
    return shared_stage_processes()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory,
                  stage_processes: StageProcesses) -> Callable[[str], ReferenceRun]:
    """The session's reference run of a domain on `reference_params`, made once and shared by the
    kill tests and the re-run test (read-only: copy it to change it)."""
    made: dict[str, ReferenceRun] = {}

    def of(domain: str) -> ReferenceRun:
        if domain not in made:
            root = tmp_path_factory.mktemp(f"reference-{domain}")
            write_params(root, reference_params(domain))
            durations = {}
            for stage in STAGES:
                code, stderr, durations[stage] = stage_processes.run(root, stage, domain)
                assert code == 0 and "Traceback" not in stderr, f"{stage}@{domain} failed:\n{stderr[-3000:]}"
            made[domain] = ReferenceRun(root, output_digests(root, domain), durations)
        return made[domain]

    return of


def cli_error(root: Path, stage: str, domain: str) -> tuple[list[str], float]:
    """Run `ssl-pipeline --root <root> <stage> <domain>` expecting a user error: exit code 2 and no
    traceback. Returns the stderr lines and the CPU seconds the command used (user + system: what
    it costs itself, whatever else the shared cores are running)."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "tasks", "--root", str(root), stage, domain],
                            capture_output=True, text=True, env=stage_env())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines(), cpu


def pretrained_state(root: Path, domain: str, **pretrain: object) -> tuple[dict, dict]:
    """Run the pretrain stage of `domain` in `root` (shards made already) from scratch with
    `pretrain` settings over the block's (e.g. nproc=2, steps=3); return the saved encoder's
    tensors and the run's log. `nproc > 1` runs the stage as that many ranks of one world (gloo
    on the CPU), forked after the imports like torchrun's processes minus the import
    (StageProcesses.run_world)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from tasks.io import read_json

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["domains"][domain].setdefault("pretrain", {}).update(pretrain)
    write_params(root, params)
    shutil.rmtree(root / "models" / domain, ignore_errors=True)
    nproc = int(params["domains"][domain]["pretrain"].get("nproc", 1))
    if nproc > 1:
        shared_stage_processes().run_world(root, "pretrain", domain, nproc)
    else:
        run_stage("pretrain", domain, root)
    folder = root / "models" / domain / "pretrain"
    tensors = {}
    for path in sorted((folder / "encoder").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors and all(isinstance(v, torch.Tensor) for v in tensors.values())
    return tensors, read_json(folder / "log.json")


@pytest.fixture
def one_torch_thread():
    """Small models on shared CPU cores: one thread is several times faster (as cpu_threads: 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A stage applies `cpu_threads` to the whole process; put torch's thread count back after each
    test, so a later test's in-process run matches the subprocess it is compared with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_close_weights(atol: float, a: dict, b: dict, what: str) -> None:
    """Same tensors, floating ones within `atol` (printed: the largest difference and how many
    elements are over 1e-5), the others equal."""
    import torch

    assert a.keys() == b.keys()
    largest, over, total = 0.0, 0, 0
    for name, tensor in a.items():
        if tensor.is_floating_point():
            difference = (tensor - b[name]).abs()
            largest = max(largest, difference.max().item())
            over, total = over + int((difference > 1e-5).sum()), total + difference.numel()
        else:
            assert torch.equal(tensor, b[name]), name
    print(f"\n{what}: max |weight difference| {largest:.2e} ({over} of {total} elements over 1e-5)")
    assert largest <= atol
