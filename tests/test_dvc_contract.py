"""dvc.yaml declares every input: the code each stage imports, the params it reads, and the
paths it writes. These tests hold dvc.yaml, the code and the params in step, so a stage can
never again run on a dependency DVC does not know of (which made stale outputs look fresh)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.cli import STAGES, run_stage
from tasks.paths import DomainPaths
from tests.conftest import REPO, tiny_params, write_params

PROJECT_PACKAGES = ("ssl_models", "tasks", "flows")


def module_file(name: str) -> Path | None:
    """The project file of module `name` (None for third-party modules)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    parts = name.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module `path` may import: top-level and function-level imports, `from x import
    submodule`, and registry entries named lazily as "package.module:attribute"."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            target = node.value.partition(":")[0]
            if target.split(".")[0] in PROJECT_PACKAGES and " " not in target:
                names.add(target)
    expanded = set()
    for name in names:  # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        expanded.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return expanded


def holds_code(path: Path) -> bool:
    """False for a package `__init__.py` that is only a docstring: nothing in it can change a result."""
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
               for node in ast.parse(path.read_text()).body)


def import_closure(*starts: Path, skip: set[Path] = frozenset()) -> set[Path]:
    """The project files `starts` may import, directly or not; what a `skip` file imports is not followed."""
    seen: set[Path] = set()
    todo = list(starts)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path not in skip:
            todo.extend(f for name in imported_modules(path) if (f := module_file(name)) is not None)
    return seen


def domain_blocks() -> dict[str, dict]:
    return yaml.safe_load((REPO / "params.yaml").read_text())["domains"]


def resolved_stage(stage: str, key: str, item: dict) -> dict:
    """dvc.yaml's `foreach` entry of `stage` with ${key} and ${item.*} filled in for one domain."""
    text = yaml.safe_dump((yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["do"]))
    text = text.replace("${key}", key)
    for name, value in item.items():
        if isinstance(value, str):
            text = text.replace(f"${{item.{name}}}", value)
    return yaml.safe_load(text)


def entries(values: list) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (plain strings or one-key mappings)."""
    return [next(iter(v)) if isinstance(v, dict) else v for v in values or []]


def test_dvc_yaml_has_one_entry_per_stage_in_the_clis_order() -> None:
    assert tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == STAGES


# modules the CLI imports only for one command: `embed` (not a stage) and `export` with options (the
# export stage's own code too): no other stage runs them (nor what they import), so a change to them
# changes no other stage's output
COMMAND_MODULES = {"embed": REPO / "tasks" / "embed.py", "export": REPO / "tasks" / "export.py"}


@pytest.mark.parametrize("stage", STAGES)
def test_every_project_module_a_stage_imports_is_among_its_deps(stage: str) -> None:
    for key, item in domain_blocks().items():
        declared = entries(resolved_stage(stage, key, item)["deps"])
        package = REPO / "ssl_models" / item["module"]
        other_commands = {path for command, path in COMMAND_MODULES.items() if command != stage}
        code = import_closure(REPO / "tasks" / "cli.py", REPO / "tasks" / "stages" / f"{stage}.py",
                              package / "__init__.py",
                              *package.glob("*.py"), skip=other_commands)
        uncovered = sorted(str(f.relative_to(REPO)) for f in code if holds_code(f) and f not in other_commands
                           and not any(f.relative_to(REPO).as_posix() == d or f.relative_to(REPO).is_relative_to(d)
                                      for d in declared))
        assert not uncovered, f"{stage}@{key} imports code dvc.yaml does not list in its deps: {uncovered}"


@pytest.mark.parametrize("stage", STAGES)
def test_the_paths_a_stage_writes_are_exactly_its_dvc_outputs(stage: str) -> None:
    for key, item in domain_blocks().items():
        entry = resolved_stage(stage, key, item)
        declared = sorted(entries(entry.get("outs")) + entries(entry.get("metrics")) + entries(entry.get("plots")))
        paths = DomainPaths(key)
        assert sorted(paths.relative(p) for p in paths.outputs(stage)) == declared


@pytest.mark.slow
def test_every_section_a_stage_reads_is_among_its_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the tiny legal spine with a config that records which settings each stage reads
    (the domain code included): each must be in the stage's dvc.yaml params."""
    import dataclasses

    from ssl_models.core import config as config_module

    write_params(tmp_path, tiny_params(ingest={"workers": 1}))  # every read in this process, where it is recorded
    read: set[str] = set()
    fields = {f.name for f in dataclasses.fields(config_module.DomainConfig)}

    class RecordingConfig(config_module.DomainConfig):
        def __getattribute__(self, name: str):
            if name in fields:
                read.add(name)
            return super().__getattribute__(name)

    real_load = config_module.load_config

    def load_recording(domain: str, params_path: Path):
        cfg, owner = real_load(domain, params_path)
        recording = RecordingConfig(**{f: object.__getattribute__(cfg, f) for f in fields})
        read.clear()
        return recording, owner

    monkeypatch.setattr(config_module, "load_config", load_recording)
    not_params = {"name", "root"}  # the block's name and where params.yaml is: not settings
    for stage in STAGES:
        run_stage(stage, "legal", tmp_path)
        declared = {p.rsplit(".", 1)[-1] for p in resolved_stage(stage, "legal", tiny_params()["domains"]["legal"])
                    .get("params", [])}
        assert read - not_params <= declared, f"{stage} reads {sorted(read - not_params - declared)} undeclared"


@pytest.mark.slow
def test_switching_pseudonymisation_makes_ingest_and_everything_downstream_stale(tmp_path: Path) -> None:
    """`dvc status` after a change of privacy.pseudonymise names ingest (and so all below it)."""
    import subprocess

    from tests.conftest import SCRIPTS, copy_project_code, stage_env

    copy_project_code(tmp_path)
    params = tiny_params(default_data={"max_files": 12})
    write_params(tmp_path, params)
    dvc = lambda *args: subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=tmp_path, env=stage_env(),  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout
    dvc("repro", "-s", "default_data@legal")
    dvc("repro", "-s", "ingest@legal")
    assert "ingest@legal" not in dvc("status", "ingest@legal")
    params["domains"]["legal"]["privacy"] = {"pseudonymise": True}
    write_params(tmp_path, params)
    status = dvc("status", "ingest@legal")
    assert "ingest@legal" in status and "domains.legal.privacy" in status


@pytest.mark.slow
def test_a_changed_raw_file_reruns_preprocess_through_the_manifest(tmp_path: Path) -> None:
    """Preprocess does not list the corpus (DVC would stat it twice a call): a raw file changed after
    both ran makes ingest stale, and ingest's new manifest (its raw files' digests) makes preprocess
    stale; re-run, both are up to date."""
    import subprocess

    from tests.conftest import SCRIPTS, copy_project_code, stage_env

    copy_project_code(tmp_path)
    for i in range(40):
        (tmp_path / "corpus" / f"{i // 10}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / f"{i // 10}" / f"doc{i}.txt").write_text(
            f"Agreement {i}. The supplier shall deliver {i} units of goods to the buyer within {i + 3} days.\n")
    (tmp_path / "labels.csv").write_text("path,label\n")  # unlabeled: DVC cannot take a null dependency
    write_params(tmp_path, tiny_params(corpus="corpus", labels="labels.csv"))
    dvc = lambda *args: subprocess.run([str(SCRIPTS / "dvc"), *args], cwd=tmp_path, env=stage_env(),  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout
    stages = ("ingest@legal", "preprocess@legal")
    dvc("repro", "-s", *stages)
    assert not any(stage in dvc("status", *stages) for stage in stages)
    (tmp_path / "corpus" / "2" / "doc25.txt").write_text("Agreement 25, amended. The buyer shall pay on delivery.\n")
    status = dvc("status", *stages)
    assert "ingest@legal" in status and "preprocess@legal" not in status
    dvc("repro", "-s", "ingest@legal")
    status = dvc("status", *stages)
    assert "preprocess@legal" in status and "data/legal/manifest" in status and "ingest@legal" not in status
    dvc("repro", "-s", "preprocess@legal")
    assert not any(stage in dvc("status", *stages) for stage in stages)


def test_importing_a_project_module_finds_its_file() -> None:
    """The closure above resolves module names to files; a wrong rule would make it vacuous."""
    assert module_file("ssl_models.core.config") == REPO / "ssl_models/core/config.py"
    assert module_file("tasks") == REPO / "tasks/__init__.py"
    assert module_file("torch") is None
    closure = import_closure(REPO / "tasks" / "stages" / "pretrain.py")
    assert REPO / "ssl_models/core/schedules.py" in closure and REPO / "tasks/lineage.py" in closure


def test_every_domain_block_has_its_export_registered_as_a_dvc_artifact() -> None:
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    for key in domain_blocks():
        entry = artifacts.get(f"{key}-encoder")
        assert entry and entry["path"] == DomainPaths(key).relative(DomainPaths(key).export), key
        assert entry["type"] == "model"


def test_every_params_entry_of_dvc_yaml_is_in_every_domain_block() -> None:
    """DVC refuses to run a stage whose params entry names a key the block lacks."""
    for key, item in domain_blocks().items():
        for stage in STAGES:
            for entry in resolved_stage(stage, key, item).get("params", []):
                assert entry.rsplit(".", 1)[-1] in item, f"params.yaml domains.{key} lacks {entry}, which {stage} reads"


@pytest.mark.slow
def test_stage_outputs_are_byte_identical_when_re_run(tmp_path: Path, reference_run,
                                                     stage_processes) -> None:
    """Re-running a stage on the same inputs rewrites the same bytes, lineage records included
    (times and run ids go to the run record beside the artifact, which DVC does not hash): each
    stage again, in order, in a copy of the session's reference run."""
    from tasks.lineage import read_run_record
    from tests.conftest import copy_project, output_digests

    reference = reference_run("legal")
    root = copy_project(reference.root, tmp_path)
    for stage in STAGES:
        code, stderr, _ = stage_processes.run(root, stage, "legal")
        assert code == 0, stderr[-3000:]
        again = output_digests(root, "legal")
        differing = sorted(name for name in again if again[name] != reference.digests.get(name))
        assert again.keys() == reference.digests.keys() and not differing, \
            f"{stage} wrote other bytes on a re-run: {differing or sorted(again.keys() ^ reference.digests.keys())}"
    run = read_run_record(DomainPaths("legal", root).pretrain)
    assert run is not None and run["stage"] == "pretrain@legal" and "ended" in run
