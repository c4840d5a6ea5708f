"""Lineage records: one `lineage.json` inside every artifact, a chain back to raw file hashes.

The record inside the artifact holds only what determines it (params, seeds, upstream and
output digests, raw file hashes), so re-running a stage on the same inputs gives the same
bytes and DVC sees nothing new downstream. What differs from run to run (start and end times,
code commit, packages, hardware, the Prefect run id) goes to a run record beside the artifact,
`.<artifact>.run.json`, which DVC does not hash. `show` prints the chain from any artifact down
to the raw corpus, with the run records when asked; `verify` re-hashes every file the chain
names and lists what no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ssl_models.core.errors import PipelineError
from ssl_models.core.hashing import digest_of, sha256_file
from ssl_models.core.privacy import pseudonymiser
from tasks.paths import relative_to

RECORD_NAME = "lineage.json"
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "dvc", "prefect", "monai",
            "lightly", "timm", "scikit-learn", "numpy")
PREFECT_RUN_ENV = "SSL_PIPELINE_PREFECT_FLOW_RUN_ID"


def hash_outputs(artifact: Path) -> dict[str, str]:
    """sha256 of every file of an artifact folder, its lineage record excluded."""
    return {str(p.relative_to(artifact)): sha256_file(p)
            for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != RECORD_NAME}


def record_path(artifact: Path) -> Path:
    return artifact / RECORD_NAME


def run_record_path(artifact: Path) -> Path:
    """Beside the artifact, outside what DVC hashes: `.<name>.run.json`."""
    return artifact.with_name(f".{artifact.name}.run.json")


def git_state(root: Path = Path(".")) -> dict[str, Any]:
    """Commit of the code and whether tracked files differ from it (dvc.lock aside)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    dirty = [line[3:] for line in changed if not line[3:].endswith("dvc.lock")]
    return {"commit": commit, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    hardware: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor() or None,
                                "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")  # only stages that compute with torch have it loaded
    if torch is not None:
        hardware["torch_threads"] = torch.get_num_threads()
        hardware["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "hardware": hardware}


@dataclass
class LineageRecorder:
    """Collects what a stage used while it runs; `write` seals it beside the artifact.

    `artifact` and `upstream` are paths under `root`; records name them relative to it."""

    stage: str
    artifact: Path
    params: dict[str, Any]
    upstream: list[Path] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    raw_inputs: dict[str, str] | None = None  # raw file -> sha256, for the first stage only
    root: Path = Path(".")
    started: float = field(default_factory=time.time)
    run_details: dict[str, Any] = field(default_factory=dict)  # timings and the like: run record only

    def write(self, folder: Path | None = None) -> dict[str, Any]:
        """Hash the artifact's files and write the record; `folder` is where the files are
        now when the stage writes to a temporary folder renamed to `artifact` afterwards."""
        folder = folder or self.artifact
        outputs = hash_outputs(folder)
        record = {
            "artifact": relative_to(self.artifact, self.root),
            "stage": self.stage,
            "params": self.params,
            "seeds": self.seeds,
            "upstream": [{"artifact": relative_to(up, self.root), "outputs_digest": read_record(up)["outputs_digest"]}
                         for up in self.upstream],
            "outputs": outputs,
            "outputs_digest": digest_of(outputs),
        }
        if self.raw_inputs is not None:
            record["raw_inputs"] = self.raw_inputs
            record["raw_inputs_digest"] = digest_of(self.raw_inputs)
        _write_json_atomically(record_path(folder), record)
        run = {"artifact": record["artifact"], "stage": self.stage, "outputs_digest": record["outputs_digest"],
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
               "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": git_state(self.root),
               "prefect_flow_run_id": os.environ.get(PREFECT_RUN_ENV), **environment(), **self.run_details}
        _write_json_atomically(run_record_path(self.artifact), run)
        return record


def _write_json_atomically(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def read_run_record(artifact: Path) -> dict[str, Any] | None:
    """The run record of the artifact's last run, when it matches the artifact's contents."""
    path = run_record_path(artifact)
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if run.get("outputs_digest") == read_record(artifact)["outputs_digest"] else None


def read_record(artifact: Path) -> dict[str, Any]:
    path = record_path(artifact)
    if not path.exists():
        raise PipelineError(f"no lineage record for {artifact} (expected {path}); run its stage first")
    return json.loads(path.read_text())


def _under(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def walk(artifact: Path, root: Path = Path(".")) -> list[tuple[int, Path, dict[str, Any], bool]]:
    """(depth, path, record, seen before) from `artifact` down to the raw corpus, depth first."""
    seen: set[str] = set()
    visits: list[tuple[int, Path, dict[str, Any], bool]] = []

    def visit(path: Path, depth: int) -> None:
        record = read_record(path)
        repeated = record["artifact"] in seen
        visits.append((depth, path, record, repeated))
        if repeated:
            return
        seen.add(record["artifact"])
        for up in record["upstream"]:
            visit(_under(root, up["artifact"]), depth + 1)

    visit(artifact, 0)
    return visits


def chain(artifact: Path, root: Path = Path(".")) -> list[tuple[Path, dict[str, Any]]]:
    """(path, record) from `artifact` down to the raw corpus, each once."""
    return [(path, record) for _, path, record, repeated in walk(artifact, root) if not repeated]


def show(artifact: Path, root: Path = Path("."), runs: bool = True) -> str:
    """A readable tree: each artifact with its stage, params digest and outputs digest, its
    upstream indented below it, down to the raw corpus' file hashes; with `runs`, also the code
    commit, end time and Prefect run of each artifact's last run (from its run record)."""
    lines: list[str] = []
    for depth, path, record, repeated in walk(artifact, root):
        pad = "  " * depth
        if repeated:
            lines.append(f"{pad}{record['artifact']}  [{record['stage']}]  (shown above)")
            continue
        params_digest = hashlib.sha256(json.dumps(record["params"], sort_keys=True).encode()).hexdigest()
        lines.append(f"{pad}{record['artifact']}  [{record['stage']}]")
        lines.append(f"{pad}  outputs {record['outputs_digest'][:16]} ({len(record['outputs'])} files)"
                     f"  params {params_digest[:12]}")
        run = read_run_record(path) if runs else None
        if run is not None:
            code = run.get("code") or {}
            lines.append(f"{pad}  code {str(code.get('commit'))[:12]}{' (dirty)' if code.get('dirty') else ''}"
                         f"  ended {run['ended']}"
                         + (f"  prefect run {run['prefect_flow_run_id']}" if run.get("prefect_flow_run_id") else ""))
        if "raw_inputs" in record:
            lines.append(f"{pad}  raw corpus {record['params'].get('corpus')}: "
                         f"{len(record['raw_inputs'])} files, digest {record['raw_inputs_digest'][:16]}")
    return "\n".join(lines)


def verify(artifact: Path, root: Path = Path(".")) -> list[str]:
    """Re-hash every artifact of the chain and every raw file; return what no longer matches."""
    problems: list[str] = []
    for path, record in chain(artifact, root):
        if not path.exists():
            problems.append(f"{record['artifact']}: missing")
            continue
        now = hash_outputs(path)
        for name, digest in record["outputs"].items():
            if name not in now:
                problems.append(f"{record['artifact']}/{name}: missing")
            elif now[name] != digest:
                problems.append(f"{record['artifact']}/{name}: content changed")
        for up in record["upstream"]:
            current = read_record(_under(root, up["artifact"]))["outputs_digest"]
            if current != up["outputs_digest"]:
                problems.append(f"{up['artifact']}: re-made since {record['artifact']} was built from it")
        if "raw_inputs" in record:
            problems.extend(_verify_raw_inputs(record, root))
    return problems


def _verify_raw_inputs(record: dict[str, Any], root: Path) -> list[str]:
    """Re-hash the raw corpus; pseudonymised names are matched through the salt, and a
    problem names a pseudonymised file by its pseudonym only."""
    shown_corpus = record["params"]["corpus"]
    corpus = _under(root, shown_corpus)
    privacy = record["params"].get("privacy") or {}
    if privacy.get("pseudonymised"):
        public = pseudonymiser(_under(root, privacy["salt_file"]), create=False)
        files = {public("key", p.relative_to(corpus).as_posix()): p for p in corpus.rglob("*") if p.is_file()}
    else:
        files = {name: corpus / name for name in record["raw_inputs"]}
    problems = []
    for name, digest in record["raw_inputs"].items():
        raw = files.get(name)
        shown = f"{shown_corpus}/{name}"
        if raw is None or not raw.exists():
            problems.append(f"raw file {shown}: missing")
        elif sha256_file(raw) != digest:
            problems.append(f"raw file {shown}: content changed")
    return problems
