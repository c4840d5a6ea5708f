"""Checkpoints of the pretrain stage and the candidate encoders it keeps: what run a checkpoint
belongs to (its fingerprint and plan), writing, sorting, verifying and loading them, the
generators' states they hold. Every file goes through tasks/io.py's durable writes.

- `step_XXXXXXXX.pt` is written to a unique temporary name (`.step_XXXXXXXX.pt.tmp-<pid>-<random>`),
  fsynced and renamed; its manifest `step_XXXXXXXX.pt.json` (sha256 of the bytes, run fingerprint,
  planned steps, wsd decay start) is written the same way just before the rename. A checkpoint whose
  bytes do not match its manifest, or that has none, is never loaded: it goes to `corrupt/` with one
  log line and an older one is tried. Loading is `torch.load(weights_only=True)`: the state holds
  tensors and plain lists, numbers and strings only.
- the fingerprint covers what changes the weights or the log (code of the loop, the method and
  the domain; the shards; optimisation, model and preprocess settings), not what only changes
  speed (SPEED_ONLY) or bookkeeping (BOOKKEEPING). Checkpoints of another fingerprint move to
  `other-runs/<fingerprint[:12]>/`, never deleted.
- `steps` is the plan sized to the corpus (`epochs` over the train rows, capped at `steps`), the
  number every rule below means; `epochs` itself is not in the fingerprint.
- with the wsd schedule `steps` is not in the fingerprint: a checkpoint taken before its own
  plan's decay started is a checkpoint of any plan whose decay starts no earlier, so raising
  (or lowering) `steps` resumes from the latest such one and decays from there. The checkpoint
  where the decay starts is always kept. Checkpoints of the superseded plan go to
  `other-runs/<fingerprint[:12]>-steps<N>/`.
- `candidates/step_XXXXXXXX/`: the encoders of up to `keep_candidates` logged checkpoints
  (spread evenly, the last and the best RankMe always among them), copied to
  `pretrain/candidates/` at the end; `pretrain/encoder` is the one `checkpoint_choice` picks.
- temporaries that killed writers left (their process gone) are removed at the start; those of
  live processes are left alone.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig, PretrainConfig, section_params
from ssl_models.core.distributed import World
from ssl_models.core.domain import Domain
from ssl_models.core.hashing import digest_of, sha256_file
from ssl_models.core.modules import PretrainMethod
from ssl_models.core.schedules import decay_start
from tasks.io import atomic_dir, atomic_file, clean_stale, fsync_path, write_text
from tasks.lineage import hash_outputs, read_record

log = logging.getLogger("pretrain")

# Bumped when the layout of a checkpoint's state changes: a checkpoint of another format is never resumed.
# 2: methods own their encoder (`backbone_encoder.*` state keys); views and masks from per-sample seeds.
# 3: weights_only-safe state (RNG states as plain lists), a sha256 manifest beside each file, candidates.
CHECKPOINT_FORMAT = 3


# Settings that change how fast a run goes, not where it ends: a checkpoint resumes across them
# (on another number of processes or workers, or another machine).
SPEED_ONLY = ("nproc", "num_workers", "precision", "parallel", "compile", "log_every",
              "activation_checkpointing", "steps_per_item")
# Settings that change what is kept, logged or chosen, never the weights of a step: a checkpoint
# resumes across them too. `checkpoint_every` and `rankme_samples` change the log: a run resumed
# across them logs the old spacing (and RankMe on the old number of rows) up to the step it resumed.
BOOKKEEPING = ("rankme_samples", "keep_checkpoints", "keep_candidates", "checkpoint_choice", "checkpoint_every")

# The code a run's weights and log come from, besides the domain's own package (hashed whole).
REPO = Path(__file__).resolve().parents[1]
LOOP_CODE = ("tasks/stages/pretrain.py", "tasks/checkpoints.py", "tasks/pretrain_data.py", "tasks/parallel.py",
             "ssl_models/core/modules.py", "ssl_models/core/schedules.py", "ssl_models/core/rankme.py",
             "ssl_models/core/device.py", "ssl_models/core/distributed.py")

MANIFEST_SUFFIX = ".json"  # step_XXXXXXXX.pt -> step_XXXXXXXX.pt.json


# --- what a checkpoint belongs to ---------------------------------------------------------------

def code_files(domain: Domain) -> list[Path]:
    """The source files of the loop, the core modules it runs and the domain's package."""
    package = Path(importlib.import_module(domain.package).__file__).parent
    return [REPO / name for name in LOOP_CODE] + sorted(package.rglob("*.py"))


def source_digest(path: Path) -> str:
    """sha256 of a Python file's syntax tree without docstrings: comments, layout and
    documentation change no fingerprint, any change of code does."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_digest(files: list[Path]) -> str:
    names = {}
    for path in files:
        try:
            name = path.resolve().relative_to(REPO).as_posix()
        except ValueError:
            name = path.name
        names[name] = source_digest(path)
    return digest_of(names)


def run_fingerprint(cfg: DomainConfig, shards_digest: str, code: str) -> str:
    """Identifies the run a checkpoint belongs to: only such checkpoints are resumed. `cfg.pretrain`
    is sized to the corpus (`PretrainConfig.for_corpus`): its `steps` are the plan, whatever
    `epochs` gave them, so `epochs` itself is left out."""
    ignored = (set(SPEED_ONLY) | set(BOOKKEEPING) | {"epochs"}
               | ({"steps"} if cfg.pretrain.schedule == "wsd" else set()))
    settings = {k: v for k, v in asdict(cfg.pretrain).items() if k not in ignored}
    payload = json.dumps({"checkpoint_format": CHECKPOINT_FORMAT, "pretrain": settings,
                          "model": section_params(cfg.model), "preprocess": section_params(cfg.preprocess),
                          "shards": shards_digest, "code": code},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint_of(cfg: DomainConfig, domain: Domain, shards: Path) -> str:
    """The fingerprint of a run of `cfg` on `shards` with this checkout's code."""
    return run_fingerprint(cfg, read_record(shards)["outputs_digest"], code_digest(code_files(domain)))


@dataclass(frozen=True)
class Plan:
    """The steps a run is planned for and, with wsd, the step its decay starts at."""

    steps: int
    decay_start: int | None

    @classmethod
    def of(cls, settings: PretrainConfig) -> Plan:
        return cls(settings.steps, decay_start(settings))

    def shares(self, manifest: dict[str, Any]) -> bool:
        """Whether the checkpoint of `manifest` is a checkpoint of this plan: its own plan, or
        both plans were still before their decay at its step (wsd)."""
        if manifest["planned_steps"] == self.steps:
            return True
        own_decay = manifest.get("decay_start")
        return (self.decay_start is not None and own_decay is not None
                and manifest["step"] <= self.decay_start and manifest["step"] <= own_decay)

    def logged_steps(self, every: int) -> list[int]:
        """Steps whose checkpoint is logged (loss, RankMe, learning rate): every `every`, and the last."""
        steps = list(range(every, self.steps + 1, every))
        return steps if steps and steps[-1] == self.steps else [*steps, self.steps]


# --- the checkpoints folder: leftovers, manifests, moving aside -----------------------------------

def clean_temporaries(folder: Path) -> None:
    """Remove what killed writers left in `folder` and its candidates: temporaries of processes
    gone, and manifests whose checkpoint was never renamed in."""
    for place in (folder, folder / "candidates"):
        clean_stale(place)
    for manifest in folder.glob(f"step_*.pt{MANIFEST_SUFFIX}"):
        if not manifest.with_suffix("").exists():
            manifest.unlink(missing_ok=True)


def _manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def _move_aside(items: list[Path], destination: Path) -> None:
    """Move `items` into `destination`, never over something already there."""
    destination.mkdir(parents=True, exist_ok=True)
    for item in items:
        if not item.exists():
            continue
        target, n = destination / item.name, 1
        while target.exists():
            target, n = destination / f"{item.name}.{n}", n + 1
        os.replace(item, target)
    fsync_path(destination)


def _read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads(_manifest_path(checkpoint).read_text())
        return manifest if {"sha256", "step", "fingerprint", "planned_steps"} <= manifest.keys() else None
    except (OSError, ValueError):
        return None


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1].split(".", 1)[0])


# --- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(folder: Path, state: dict[str, Any], plan: Plan, keep: int) -> None:
    """Write `state` durably with its manifest, then drop all but the newest `keep` (the one
    where a wsd decay starts is always kept: a longer plan resumes from it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:  # a handle, not a path: torch.save names the archive after a path
            torch.save(state, handle)
        manifest = {"format": CHECKPOINT_FORMAT, "step": state["step"], "fingerprint": state["fingerprint"],
                    "planned_steps": plan.steps, "decay_start": plan.decay_start, "sha256": sha256_file(tmp)}
        # the manifest first: a kill between the two leaves a manifest without a checkpoint (cleaned
        # at start), never a complete checkpoint without its checksum
        write_text(_manifest_path(path), json.dumps(manifest, sort_keys=True))
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        if _step_of(old) != plan.decay_start:
            old.unlink()
            _manifest_path(old).unlink(missing_ok=True)


def _quarantine(checkpoint: Path, why: str) -> None:
    log.warning("checkpoint %s %s: never loaded, moved to %s/corrupt/", checkpoint.name, why,
                checkpoint.parent.name)
    _move_aside([checkpoint, _manifest_path(checkpoint)], checkpoint.parent / "corrupt")


def sort_checkpoints(folder: Path, fingerprint: str, plan: Plan) -> Path | None:
    """Rank 0, at start: clean temporaries, move aside checkpoints without a manifest (corrupt/)
    and of other runs or plans (other-runs/, with the candidate encoders they kept), and return
    where this run's superseded plan went, if one did (its bytes are checked when loaded)."""
    if not folder.exists():
        return None
    clean_temporaries(folder)
    owner = _candidates_owner(folder)
    if owner is not None and owner != fingerprint:
        log.info("moving the candidate encoders of another configuration or code to %s/other-runs/%s/candidates/",
                 folder.name, owner[:12])
        _move_aside([folder / "candidates"], folder / "other-runs" / owner[:12])
    foreign: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("step_*.pt")):
        manifest = _read_manifest(path)
        if manifest is None:
            _quarantine(path, "has no readable checksum manifest (damaged, or written before checksums)")
        elif manifest["fingerprint"] != fingerprint:
            foreign.setdefault(manifest["fingerprint"][:12], []).append(path)
        elif not plan.shares(manifest):
            foreign.setdefault(f"{fingerprint[:12]}-steps{manifest['planned_steps']}", []).append(path)
    for name, paths in foreign.items():
        log.info("moving %d checkpoint(s) of another %s to %s/other-runs/%s/ (kept, never resumed by this run)",
                 len(paths), "plan of this run (steps)" if "-steps" in name else "configuration or code",
                 folder.name, name)
        _move_aside([p for path in paths for p in (path, _manifest_path(path))], folder / "other-runs" / name)
    superseded = [name for name in foreign if name.startswith(f"{fingerprint[:12]}-steps")]
    return folder / "other-runs" / superseded[-1] if superseded else None


def load_checkpoint(folder: Path, fingerprint: str, plan: Plan, tidy: bool) -> dict[str, Any] | None:
    """The state of the newest checkpoint of this run whose bytes match their checksum
    (`tidy`: rank 0, which quarantines a mismatch; run `sort_checkpoints` first)."""
    for path in sorted(folder.glob("step_*.pt"), reverse=True):
        manifest = _read_manifest(path)
        if manifest is None or manifest["fingerprint"] != fingerprint or not plan.shares(manifest):
            continue
        try:
            matches = sha256_file(path) == manifest["sha256"]
        except OSError:  # moved to corrupt/ by rank 0 meanwhile
            continue
        if not matches:
            if tidy:
                _quarantine(path, "does not match its sha256")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- any unreadable file is skipped the same way
            if tidy:
                _quarantine(path, f"is unreadable ({type(error).__name__})")
            continue
        if state.get("fingerprint") == fingerprint and state.get("step") == manifest["step"]:
            return state
        if tidy:
            _quarantine(path, "holds another run than its manifest names")
    return None


def resume_point(folder: Path, fingerprint: str, plan: Plan, world: World) -> dict[str, Any] | None:
    """The state of the newest checkpoint of this run, or None (start at step 0). Rank 0 first moves
    aside what no process may load, and after drops the candidates past the resume point: a
    superseded plan's (kept aside with its checkpoints) or a killed run's (rebuilt)."""
    superseded = sort_checkpoints(folder, fingerprint, plan) if world.is_main else None
    distributed.barrier()
    state = load_checkpoint(folder, fingerprint, plan, tidy=world.is_main)
    if world.is_main:
        prune_candidates(folder, {}, after=state["step"] if state is not None else 0, aside=superseded)
    distributed.barrier()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The generators' states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


# --- candidate encoders -------------------------------------------------------------------------

CANDIDATES_OWNER = "fingerprint"  # checkpoints/candidates/fingerprint: the run the encoders belong to


def _candidate(folder: Path, step: int) -> Path:
    return folder / "candidates" / f"step_{step:08d}"


def _candidates_owner(folder: Path) -> str | None:
    try:
        return (folder / "candidates" / CANDIDATES_OWNER).read_text().strip() or None
    except OSError:
        return None


def save_candidate(folder: Path, step: int, method: PretrainMethod, device: torch.device, fingerprint: str) -> str:
    """`method.encoder().save(...)` into checkpoints/candidates/step_XXXXXXXX/ (a temporary
    folder renamed in); returns the digest of its files."""
    encoder = method.encoder() if device.type == "cpu" else copy.deepcopy(method.encoder()).cpu()
    target = _candidate(folder, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    if _candidates_owner(folder) != fingerprint:
        write_text(target.parent / CANDIDATES_OWNER, fingerprint)
    with atomic_dir(target) as tmp:
        encoder.save(tmp)
    return digest_of(hash_outputs(target))


def prune_candidates(folder: Path, kept: dict[str, str], after: int | None = None,
                     aside: Path | None = None) -> None:
    """Remove candidate folders not in `kept` (step -> digest); `after`: only those past that
    step, moved to `aside` when they belong to a superseded plan."""
    for path in sorted((folder / "candidates").glob("step_*")):
        if path.name.startswith(".") or str(_step_of(path)) in kept:
            continue
        if after is not None and _step_of(path) <= after:
            continue
        if aside is not None:
            _move_aside([path], aside / "candidates")
        else:
            shutil.rmtree(path)


def verified_candidates(folder: Path, kept: dict[str, str]) -> dict[int, Path]:
    """The candidate folders whose files still match their digests; the others are logged and
    moved to corrupt/ (a chosen encoder is never a damaged copy)."""
    good = {}
    for step, digest in kept.items():
        path = _candidate(folder, int(step))
        if path.is_dir() and digest_of(hash_outputs(path)) == digest:
            good[int(step)] = path
        else:
            log.warning("candidate encoder %s is missing or does not match its digest: left out", path.name)
            if path.exists():
                _move_aside([path], folder / "corrupt" / "candidates")
    return good
