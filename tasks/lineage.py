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
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ssl_models.core.errors import PipelineError
from ssl_models.core.hashing import digest_of, file_sha256, sha256_file
from ssl_models.core.privacy import pseudonymiser
from ssl_models.core.shards import LABELED, PRETRAIN_PARTS
from tasks.io import read_jsonl, write_text
from tasks.paths import DomainPaths, relative_to

RECORD_NAME = "lineage.json"
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "dvc", "prefect", "monai",
            "lightly", "timm", "scikit-learn", "numpy")
PREFECT_RUN_ENV = "SSL_PIPELINE_PREFECT_FLOW_RUN_ID"


def hash_outputs(artifact: Path, exclude: str = RECORD_NAME) -> dict[str, str]:
    """sha256 of every file of an artifact folder, its lineage record (or the `exclude` file) left out."""
    return {str(p.relative_to(artifact)): file_sha256(p)
            for p in sorted(artifact.rglob("*")) if p.is_file() and p.name != exclude}


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
    # the first stage's raw files: (its artifact's JSON-lines file of {"key", "sha256"}, its lines)
    raw_inputs_file: tuple[str, int] | None = None
    root: Path = Path(".")
    started: float = field(default_factory=time.time)
    run_details: dict[str, Any] = field(default_factory=dict)  # timings and the like: run record only
    # other files the stage read (the labels CSV): name as in params.yaml -> path. None: the
    # `labels` entry of `params` when it names a file. Hashed now, when the stage has just read them.
    inputs: dict[str, Path] | None = None
    input_hashes: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.inputs is None:
            labels = self.params.get("labels")
            self.inputs = {labels: _under(self.root, labels)} if isinstance(labels, str) and labels else {}
        for name, path in self.inputs.items():
            if not path.is_file():
                raise PipelineError(f"{self.stage}: input file {name} not found")
            self.input_hashes[name] = file_sha256(path)

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
        if self.input_hashes:
            record["inputs"] = dict(self.input_hashes)
        if self.raw_inputs_file is not None:
            name, count = self.raw_inputs_file
            record.update(raw_inputs_file=name, raw_inputs_count=count, raw_inputs_digest=outputs[name])
        _write_json_atomically(record_path(folder), record)
        run = {"artifact": record["artifact"], "stage": self.stage, "outputs_digest": record["outputs_digest"],
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
               "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": git_state(self.root),
               "prefect_flow_run_id": os.environ.get(PREFECT_RUN_ENV), **environment(), **self.run_details}
        _write_json_atomically(run_record_path(self.artifact), run)
        return record


def _write_json_atomically(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=1, sort_keys=True))


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
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(f"lineage record {path} is damaged (not JSON); re-run the stage that made "
                            f"{artifact.name}") from None


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
        for name, digest in (record.get("inputs") or {}).items():
            lines.append(f"{pad}  input {name}: sha256 {digest[:16]}")
        if has_raw_inputs(record):
            count = record["raw_inputs_count"] if "raw_inputs_file" in record else len(record["raw_inputs"])
            lines.append(f"{pad}  raw corpus {record['params'].get('corpus')}: "
                         f"{count} files, digest {record['raw_inputs_digest'][:16]}")
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
        for name, digest in (record.get("inputs") or {}).items():
            problems.extend(_verify_input(name, digest, root, record["stage"]))
        if has_raw_inputs(record):
            problems.extend(_verify_raw_inputs(record, root))
    return problems


def _verify_input(name: str, digest: str, root: Path, stage: str) -> list[str]:
    path = _under(root, name)
    if not path.is_file():
        return [f"input file {name}: missing (read by {stage})"]
    if sha256_file(path) != digest:
        return [f"input file {name}: content changed since {stage} read it"]
    return []


def check_outputs_intact(artifact: Path, shown: str, made_by: str) -> None:
    """Before a stage reads `artifact`: every file still has the sha256 its stage recorded when it
    wrote it (lineage.json) and none is missing; else one line naming the first (a damaged shard
    or encoder is never read). Files added since (a library's cache, an OS's) are let be."""
    record = read_record(artifact)
    now = hash_outputs(artifact)
    recorded = record.get("outputs", {})
    problems = [f"{name}: {'missing' if name not in now else 'content changed'}"
                for name in sorted(recorded) if now.get(name) != recorded[name]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"{shown}/{problems[0]}{more} since {made_by} wrote it (damaged or edited); "
                            f"restore it (`dvc checkout`) or re-run {made_by} (`dvc repro -f -s {made_by}`)")


def check_raw_inputs_unchanged(artifact: Path, root: Path, made_by: str) -> None:
    """Before a stage reads the raw corpus again: every raw file still has the hash `made_by`
    recorded in `artifact`, else one line naming the file (by its pseudonym when names are hidden)."""
    record = read_record(artifact)
    problems = _verify_raw_inputs(record, root) if has_raw_inputs(record) else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"{problems[0]}{more} since {made_by} recorded it in {record['artifact']}; "
                            f"re-run {made_by} first (`dvc repro` does both)")


def has_raw_inputs(record: dict[str, Any]) -> bool:
    """Whether a lineage record lists the raw files its stage read (ingest's does)."""
    return "raw_inputs" in record or "raw_inputs_file" in record


def raw_inputs(record: dict[str, Any], root: Path) -> Iterator[tuple[str, str]]:
    """(key, sha256) of every raw file a lineage record lists, one at a time: from its artifact's
    `raw_inputs_file` (ingest writes one, so a corpus of millions is never held), or from an
    older record's inline `raw_inputs`."""
    if "raw_inputs_file" not in record:
        yield from (record.get("raw_inputs") or {}).items()
        return
    with open(_under(root, record["artifact"]) / record["raw_inputs_file"], encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            yield entry["key"], entry["sha256"]


def _verify_raw_inputs(record: dict[str, Any], root: Path) -> list[str]:
    """Re-hash the raw corpus; pseudonymised names are matched through the salt, and a
    problem names a pseudonymised file by its pseudonym only."""
    shown_corpus = record["params"]["corpus"]
    corpus = _under(root, shown_corpus)
    privacy = record["params"].get("privacy") or {}
    if privacy.get("pseudonymised"):
        public = pseudonymiser(_under(root, privacy["salt_file"]), create=False)
        from tasks.sources import corpus_files, relative_key  # the corpus as ingest listed it (its symlink rule)

        follow = (record["params"].get("ingest") or {}).get("follow_symlinks", False)
        listed = corpus_files(corpus, None, follow_symlinks=follow).files
        files = {public("key", relative_key(p, corpus)): p for p in listed}
    else:
        files = None
    problems = []
    for name, digest in raw_inputs(record, root):
        raw = corpus / name if files is None else files.get(name)
        shown = f"{shown_corpus}/{name}"
        if raw is None or not raw.exists():
            problems.append(f"raw file {shown}: missing")
        elif file_sha256(raw) != digest:
            problems.append(f"raw file {shown}: content changed")
    return problems


# --- the record-level ledger: which artifacts consumed one raw record ---


def _record_keys(query: str, record: dict[str, Any], root: Path) -> set[str]:
    """The manifest keys `query` may stand for: itself, its name relative to the corpus, and
    the pseudonym of that name when the domain pseudonymises (computed with the salt)."""
    params = record["params"]
    corpus = _under(root, params["corpus"])
    names = {query}
    for prefix in (str(params["corpus"]).rstrip("/") + "/", str(corpus).rstrip("/") + "/",
                   str(corpus.resolve()).rstrip("/") + "/"):
        if query.startswith(prefix):
            names.add(query[len(prefix):])
    privacy = params.get("privacy") or {}
    if privacy.get("pseudonymised"):
        public = pseudonymiser(_under(root, privacy["salt_file"]), create=False)
        names |= {public("key", name) for name in list(names)}
    return names


def _consistent(artifact: Path, upstream: Path) -> bool:
    """Whether `artifact` was built from the `upstream` now on disk."""
    try:
        ups = {up["artifact"]: up["outputs_digest"] for up in read_record(artifact)["upstream"]}
        current = read_record(upstream)
    except (PipelineError, OSError, ValueError):
        return False
    return ups.get(current["artifact"]) == current["outputs_digest"]


def which(query: str, root: Path = Path("."), domains: list[str] | None = None) -> str:
    """Which manifest, shards, checkpoints, fine-tuned models and reports consumed the raw record
    `query` (a file name in the corpus, its pseudonym, a manifest key or a sha256): the answer to a
    consent withdrawal or a legal hold, derived from the manifests and the lineage records."""
    from ssl_models.core.config import load_params

    names = domains or list((load_params(root / "params.yaml").get("domains") or {}))
    lines: list[str] = []
    for name in names:
        paths = DomainPaths(name, root)
        if not record_path(paths.manifest).exists():
            continue
        manifest_record = read_record(paths.manifest)
        keys = _record_keys(query, manifest_record, root)
        keys |= {key for key, digest in raw_inputs(manifest_record, root) if digest == query}
        rows = [row for row in read_jsonl(paths.manifest / "manifest.jsonl")
                if row["key"] in keys or row.get("source") in keys or row["sha256"] == query]
        quarantined = [row for row in read_jsonl(paths.manifest / "quarantine.jsonl") if row["key"] in keys]
        duplicates = [row for row in read_jsonl(paths.manifest / "duplicates.jsonl") if row["key"] in keys]
        if duplicates:  # its content reached the pipeline through the copy that was kept
            kept = {row["duplicate_of"] for row in duplicates}
            rows += [row for row in read_jsonl(paths.manifest / "manifest.jsonl") if row["key"] in kept]
        if not (rows or quarantined or duplicates):
            continue
        lines.append(f"domain {name}:")
        for row in quarantined:
            lines.append(f"  {row['key']}: quarantined ({row['reason']}); no artifact consumed it")
        for row in duplicates:
            lines.append(f"  {row['key']}: a duplicate of {row['duplicate_of']}, whose identical content is used")
        for row in rows:
            lines.extend(f"  {line}" for line in _consumers(row, paths))
    if not lines:
        return f"no record {query} in any manifest ({', '.join(names) or 'no domains'})"
    return "\n".join(lines)


def _consumers(row: dict[str, Any], paths: DomainPaths) -> list[str]:
    rel = paths.relative
    split, labeled = row.get("split"), row.get("label") is not None
    lines = [f"record {row['key']} (sha256 {row['sha256'][:16]}, split {split}"
             f"{', labeled' if labeled else ''}):",
             f"  manifest    {rel(paths.manifest)}/manifest.jsonl"]
    stale = lambda artifact, upstream: "" if _consistent(artifact, upstream) else "  (built from an older input: re-run)"  # noqa: E731
    parts = [part for part in (PRETRAIN_PARTS.get(split), LABELED if labeled else None) if part]
    if not record_path(paths.shards).exists():
        return lines
    present = [part for part in parts if (paths.shards / part).exists()]
    lines.append(f"  shards      {rel(paths.shards)}: {', '.join(present) or 'none of its parts'}"
                 f"{stale(paths.shards, paths.manifest)}")
    if record_path(paths.pretrain).exists() and split in PRETRAIN_PARTS:
        use = "trained on" if split == "train" else "scored for RankMe / the checkpoint choice"
        checkpoints = sorted(p.name for p in paths.checkpoints.glob("step_*")
                             if not p.name.endswith(".json")) if paths.checkpoints.exists() else []
        candidates = sorted(p.name for p in (paths.pretrain / "candidates").glob("step_*"))
        lines.append(f"  pretrain    {rel(paths.pretrain)} ({use}): encoder/"
                     f"{', candidates ' + ', '.join(candidates) if candidates else ''}"
                     f"{stale(paths.pretrain, paths.shards)}")
        if checkpoints:
            lines.append(f"  checkpoints {rel(paths.checkpoints)}: {', '.join(checkpoints)}")
    if record_path(paths.finetune).exists():
        if labeled and split != "test":
            use = "in the labeled pool: trained on at label fraction 1.0, at smaller fractions when drawn"
        elif labeled:
            use = "in the labeled test set: scored, never trained on"
        else:
            use = "through the pretrained encoder only"
        if labeled or split == "train":
            saved = sorted(p.name for p in (paths.finetune / "models").glob("*")) if (paths.finetune / "models").exists() else []
            lines.append(f"  finetune    {rel(paths.finetune)} ({use})"
                         f"{': models ' + ', '.join(saved) if saved else ''}{stale(paths.finetune, paths.shards)}")
            for artifact in (paths.evaluation, paths.report):
                if record_path(artifact).exists():
                    lines.append(f"  {'evaluate' if artifact == paths.evaluation else 'report':<11} {rel(artifact)}")
    return lines


def _root_of(artifact: Path, record: dict[str, Any]) -> Path:
    """The project root an artifact folder lies in: its record names it relative to that root."""
    depth = len(Path(record["artifact"]).parts)
    return artifact.resolve().parents[depth - 1] if depth else artifact.resolve()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _changes(what: str, a: dict[str, Any], b: dict[str, Any], values: bool = True) -> list[str]:
    """One line per key whose value differs between `a` and `b` (with the values, or without)."""
    lines = []
    for key in sorted(set(a) | set(b), key=str):
        if key not in b:
            lines.append(f"{what} {key}: only in A")
        elif key not in a:
            lines.append(f"{what} {key}: only in B")
        elif a[key] != b[key]:
            lines.append(f"{what} {key}: {a[key]!r} -> {b[key]!r}" if values else f"{what} {key}: changed")
    return lines


def diff(a: Path, b: Path) -> list[str]:
    """What differs between two runs' lineage, from artifact folder `a` (run A) and the same
    artifact of another run `b` (run B, e.g. another clone or experiment workspace), down to the
    raw corpus: raw files (added, removed, changed), other inputs (the labels CSV), params and
    seeds per stage, the code each stage ran (commit, uncommitted changes: where both sides have the
    run record, which stays on the machine that ran the stage, so a clone that pulled the outputs
    has none), which artifacts' outputs differ, and the domain's metrics where both runs have them.
    Empty: the same run."""
    record_a, record_b = read_record(a), read_record(b)
    root_a, root_b = _root_of(a, record_a), _root_of(b, record_b)
    chain_a = {record["artifact"]: (path, record) for path, record in chain(a, root_a)}
    chain_b = {record["artifact"]: (path, record) for path, record in chain(b, root_b)}
    lines: list[str] = []
    for name in sorted(set(chain_a) | set(chain_b)):
        if name not in chain_b or name not in chain_a:
            lines.append(f"{name}: only in {'A' if name in chain_a else 'B'}")
            continue
        (path_a, x), (path_b, y) = chain_a[name], chain_b[name]
        stage = x["stage"]
        lines += _changes(f"{stage} raw file", dict(raw_inputs(x, root_a)), dict(raw_inputs(y, root_b)), values=False)
        lines += _changes(f"{stage} input", x.get("inputs", {}), y.get("inputs", {}), values=False)
        lines += _changes(f"{stage} param", _flatten(x["params"]), _flatten(y["params"]))
        if x["seeds"] != y["seeds"]:
            lines.append(f"{stage} seeds: {x['seeds']} -> {y['seeds']}")
        # a run record stays where its stage ran: a clone that pulled the outputs (`dvc pull`) has
        # none, and code it cannot know is not code that differs
        run_a, run_b = read_run_record(path_a), read_run_record(path_b)
        if run_a is not None and run_b is not None:
            lines += _changes(f"{stage} code", run_a.get("code", {}), run_b.get("code", {}))
        if x["outputs_digest"] != y["outputs_digest"]:
            differing = sum(1 for k in set(x["outputs"]) | set(y["outputs"]) if x["outputs"].get(k) != y["outputs"].get(k))
            lines.append(f"{name}: outputs differ ({differing} of {len(set(x['outputs']) | set(y['outputs']))} files)")
    domain = record_a["stage"].partition("@")[2]
    metrics_a, metrics_b = (root / "reports" / domain / "metrics.json" for root in (root_a, root_b))
    if domain and metrics_a.exists() and metrics_b.exists():
        best_a = _flatten(json.loads(metrics_a.read_text(encoding="utf-8")).get("best", {}))
        best_b = _flatten(json.loads(metrics_b.read_text(encoding="utf-8")).get("best", {}))
        lines += _changes("metric best", best_a, best_b)
    return lines
