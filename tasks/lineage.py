"""Lineage records: one `lineage.json` beside every artifact, a chain back to raw file hashes.

`show` prints the chain from any artifact down to the raw corpus; `verify` re-hashes every
file the chain names and lists what no longer matches.
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
from ssl_models.core.privacy import pseudonymiser

RECORD_NAME = "lineage.json"
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "dvc", "prefect", "monai",
            "lightly", "timm", "scikit-learn", "numpy")
PREFECT_RUN_ENV = "SSL_PIPELINE_PREFECT_FLOW_RUN_ID"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_outputs(artifact: Path) -> dict[str, str]:
    """sha256 of every file of an artifact folder, its lineage record excluded."""
    return {str(p.relative_to(artifact)): sha256_file(p)
            for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != RECORD_NAME}


def digest_of(hashes: dict[str, str]) -> str:
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(hashes.items())).encode()).hexdigest()


def record_path(artifact: Path) -> Path:
    return artifact / RECORD_NAME


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
    """Collects what a stage used while it runs; `write` seals it beside the artifact."""

    stage: str
    artifact: Path
    params: dict[str, Any]
    upstream: list[Path] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    raw_inputs: dict[str, str] | None = None  # raw file -> sha256, for the first stage only
    started: float = field(default_factory=time.time)

    def write(self, folder: Path | None = None) -> dict[str, Any]:
        """Hash the artifact's files and write the record; `folder` is where the files are
        now when the stage writes to a temporary folder renamed to `artifact` afterwards."""
        folder = folder or self.artifact
        outputs = hash_outputs(folder)
        record = {
            "artifact": str(self.artifact),
            "stage": self.stage,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "params": self.params,
            "seeds": self.seeds,
            "code": git_state(),
            "prefect_flow_run_id": os.environ.get(PREFECT_RUN_ENV),
            **environment(),
            "upstream": [{"artifact": str(up), "outputs_digest": read_record(up)["outputs_digest"]}
                         for up in self.upstream],
            "outputs": outputs,
            "outputs_digest": digest_of(outputs),
        }
        if self.raw_inputs is not None:
            record["raw_inputs"] = self.raw_inputs
            record["raw_inputs_digest"] = digest_of(self.raw_inputs)
        path = record_path(folder)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(path)
        return record


def read_record(artifact: Path) -> dict[str, Any]:
    path = record_path(artifact)
    if not path.exists():
        raise PipelineError(f"no lineage record for {artifact} (expected {path}); run its stage first")
    return json.loads(path.read_text())


def walk(artifact: Path) -> list[tuple[int, dict[str, Any], bool]]:
    """(depth, record, seen before) from `artifact` down to the raw corpus, depth first."""
    seen: set[str] = set()
    visits: list[tuple[int, dict[str, Any], bool]] = []

    def visit(path: Path, depth: int) -> None:
        record = read_record(path)
        repeated = str(path) in seen
        visits.append((depth, record, repeated))
        if repeated:
            return
        seen.add(str(path))
        for up in record["upstream"]:
            visit(Path(up["artifact"]), depth + 1)

    visit(artifact, 0)
    return visits


def chain(artifact: Path) -> list[dict[str, Any]]:
    """The records from `artifact` down to the raw corpus, each once."""
    return [record for _, record, repeated in walk(artifact) if not repeated]


def show(artifact: Path) -> str:
    """A readable tree: each artifact with its stage, code, params digest and outputs digest,
    its upstream indented below it, down to the raw corpus' file hashes."""
    lines: list[str] = []
    for depth, record, repeated in walk(artifact):
        pad = "  " * depth
        if repeated:
            lines.append(f"{pad}{record['artifact']}  [{record['stage']}]  (shown above)")
            continue
        code = record["code"]
        params_digest = hashlib.sha256(json.dumps(record["params"], sort_keys=True).encode()).hexdigest()
        lines.append(f"{pad}{record['artifact']}  [{record['stage']}]")
        lines.append(f"{pad}  outputs {record['outputs_digest'][:16]} ({len(record['outputs'])} files)"
                     f"  code {str(code['commit'])[:12]}{' (dirty)' if code['dirty'] else ''}"
                     f"  params {params_digest[:12]}  ended {record['ended']}"
                     + (f"  prefect run {record['prefect_flow_run_id']}" if record.get("prefect_flow_run_id") else ""))
        if "raw_inputs" in record:
            lines.append(f"{pad}  raw corpus {record['params'].get('corpus')}: "
                         f"{len(record['raw_inputs'])} files, digest {record['raw_inputs_digest'][:16]}")
    return "\n".join(lines)


def verify(artifact: Path) -> list[str]:
    """Re-hash every artifact of the chain and every raw file; return what no longer matches."""
    problems: list[str] = []
    for record in chain(artifact):
        path = Path(record["artifact"])
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        now = hash_outputs(path)
        for name, digest in record["outputs"].items():
            if name not in now:
                problems.append(f"{path / name}: missing")
            elif now[name] != digest:
                problems.append(f"{path / name}: content changed")
        for up in record["upstream"]:
            current = read_record(Path(up["artifact"]))["outputs_digest"]
            if current != up["outputs_digest"]:
                problems.append(f"{up['artifact']}: re-made since {path} was built from it")
        if "raw_inputs" in record:
            problems.extend(_verify_raw_inputs(record))
    return problems


def _verify_raw_inputs(record: dict[str, Any]) -> list[str]:
    """Re-hash the raw corpus; pseudonymised names are matched through the salt, and a
    problem names a pseudonymised file by its pseudonym only."""
    corpus = Path(record["params"]["corpus"])
    privacy = record["params"].get("privacy") or {}
    if privacy.get("pseudonymised"):
        public = pseudonymiser(privacy["salt_file"], create=False)
        files = {public("key", p.relative_to(corpus).as_posix()): p for p in corpus.rglob("*") if p.is_file()}
    else:
        files = {name: corpus / name for name in record["raw_inputs"]}
    problems = []
    for name, digest in record["raw_inputs"].items():
        raw = files.get(name)
        shown = f"{corpus}/{name}"
        if raw is None or not raw.exists():
            problems.append(f"raw file {shown}: missing")
        elif sha256_file(raw) != digest:
            problems.append(f"raw file {shown}: content changed")
    return problems
