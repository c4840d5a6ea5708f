"""pretrain: the SSL method chosen in params.yaml on the domain's pretraining shards.

The loop is plain: the batch of step `s` is a function of `s` alone (a seeded permutation of the
rows; views and masks from per-sample seeds), built by the method's data side in DataLoader
workers; loss, step, and every `checkpoint_every` steps the loss, RankMe on held-out rows and a
checkpoint holding everything needed to resume exactly (model, optimizer, scheduler, RNG states,
step). A run killed at any moment and re-run ends with the same weights.

`pretrain.batch_size` is the global batch. With `nproc > 1` the stage re-starts itself under
`torch.distributed.run`; each process takes its slice of every step's batch and DDP (or FSDP2)
averages the gradients, so the world size changes nothing but speed. Rank 0 writes the
checkpoints and the outputs; a run resumes on any world size.

Checkpoints (`models/<domain>/checkpoints/`):
- `step_XXXXXXXX.pt` is written to a unique temporary name, fsynced and renamed; its manifest
  `step_XXXXXXXX.pt.json` (sha256 of the bytes, run fingerprint, planned steps, wsd decay start)
  is written the same way just before the rename. A checkpoint whose bytes do not match its
  manifest, or that has none, is never loaded: it goes to `corrupt/` with one log line and an
  older one is tried. Loading is `torch.load(weights_only=True)`: the state holds tensors and
  plain lists, numbers and strings only.
- the fingerprint covers what changes the weights or the log (code of the loop, the method and
  the domain; the shards; optimisation, model and preprocess settings), not what only changes
  speed (SPEED_ONLY) or bookkeeping (BOOKKEEPING). Checkpoints of another fingerprint move to
  `other-runs/<fingerprint[:12]>/`, never deleted.
- with the wsd schedule `steps` is not in the fingerprint: a checkpoint taken before its own
  plan's decay started is a checkpoint of any plan whose decay starts no earlier, so raising
  (or lowering) `steps` resumes from the latest such one and decays from there. The checkpoint
  where the decay starts is always kept. Checkpoints of the superseded plan go to
  `other-runs/<fingerprint[:12]>-steps<N>/`.
- `candidates/step_XXXXXXXX/`: the encoders of up to `keep_candidates` logged checkpoints
  (spread evenly, the last and the best RankMe always among them), copied to
  `pretrain/candidates/` at the end; `pretrain/encoder` is the one `checkpoint_choice` picks.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import importlib
import json
import logging
import os
import random
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig, PretrainConfig, section_params
from ssl_models.core.device import autocast, keep_freed_memory, move, set_cpu_threads, training_device
from ssl_models.core.distributed import World
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.hashing import digest_of, sha256_file
from ssl_models.core.modules import PretrainMethod
from ssl_models.core.processes import process_alive
from ssl_models.core.rankme import candidate_steps, choice_rule, choose_checkpoint, effective_rank
from ssl_models.core.schedules import decay_start, make_schedule, move_schedule_to
from tasks.io import atomic_dir, read_json, write_json
from tasks.lineage import LineageRecorder, hash_outputs, read_record
from tasks.parallel import (
    load_states,
    model_state,
    optimizer_state,
    unsharded,
    wrap_for_world,
)
from tasks.paths import DomainPaths
from tasks.pretrain_data import StepBatches, step_loader, steps_of

log = logging.getLogger("pretrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
REPO = Path(__file__).resolve().parents[2]
LOOP_CODE = ("tasks/stages/pretrain.py", "tasks/pretrain_data.py", "tasks/parallel.py",
             "ssl_models/core/modules.py", "ssl_models/core/schedules.py", "ssl_models/core/rankme.py",
             "ssl_models/core/device.py", "ssl_models/core/distributed.py")

MANIFEST_SUFFIX = ".json"  # step_XXXXXXXX.pt -> step_XXXXXXXX.pt.json
TEMPORARY = ".tmp-"  # .<name>.tmp-<pid>-<random>: a write in progress, or left by a killed one


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
    """Identifies the run a checkpoint belongs to: only such checkpoints are resumed."""
    ignored = set(SPEED_ONLY) | set(BOOKKEEPING) | ({"steps"} if cfg.pretrain.schedule == "wsd" else set())
    settings = {k: v for k, v in asdict(cfg.pretrain).items() if k not in ignored}
    payload = json.dumps({"checkpoint_format": CHECKPOINT_FORMAT, "pretrain": settings,
                          "model": section_params(cfg.model), "preprocess": section_params(cfg.preprocess),
                          "shards": shards_digest, "code": code},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


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


# --- durable files ------------------------------------------------------------------------------

def _temporary(path: Path) -> Path:
    # unique per writer (pid + random, from os.urandom: no generator of the run moves), so two runs
    # on one workspace never write the same temporary
    return path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _writer_alive(name: str) -> bool:
    """Whether the process that owns temporary `name` still runs (this process: no, a stage
    starts with no write of its own in flight)."""
    try:
        pid = int(name.rsplit(TEMPORARY, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and process_alive(pid)


def clean_temporaries(folder: Path) -> None:
    """Remove what killed writers left in `folder` and its candidates: temporaries of processes
    gone, and manifests whose checkpoint was never renamed in."""
    for place in (folder, folder / "candidates"):
        for stale in place.glob(f".*{TEMPORARY}*"):
            if not _writer_alive(stale.name):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
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
    _fsync(destination)


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
    tmp = _temporary(path)
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    manifest = {"format": CHECKPOINT_FORMAT, "step": state["step"], "fingerprint": state["fingerprint"],
                "planned_steps": plan.steps, "decay_start": plan.decay_start, "sha256": sha256_file(tmp)}
    # the manifest first: a kill between the two leaves a manifest without a checkpoint (cleaned at
    # start), never a complete checkpoint without its checksum
    _write_durably(_manifest_path(path), json.dumps(manifest, sort_keys=True).encode())
    os.replace(tmp, path)
    _fsync(folder)
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
        _write_durably(target.parent / CANDIDATES_OWNER, fingerprint.encode())
    tmp = _temporary(target)
    encoder.save(tmp)
    for written in tmp.rglob("*"):
        if written.is_file():
            _fsync(written)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _fsync(target.parent)
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


# --- the stage ----------------------------------------------------------------------------------

@torch.no_grad()
def rankme(method: PretrainMethod, rows: list[dict[str, Any]], batch_size: int,
           device: torch.device = torch.device("cpu")) -> float:
    """The effective rank of the encoder's features of `rows` (on the CPU: domain `embed`
    methods build CPU tensors; a GPU run embeds a CPU copy, leaving the trained modules alone)."""
    model = method if device.type == "cpu" else copy.deepcopy(method).cpu()
    was_training = model.training
    model.eval()
    features = torch.cat([model.embed(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])
    model.train(was_training)
    return effective_rank(features.float())


def check_batch_splits(cfg: DomainConfig, processes: int) -> None:
    """The global batch must split evenly into processes x accumulation rounds."""
    settings = cfg.pretrain
    if settings.batch_size % (processes * settings.grad_accumulation):
        raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.batch_size {settings.batch_size} must divide "
                            f"by {processes} process(es) x grad_accumulation ({settings.grad_accumulation})")


def pretrain(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    settings = cfg.pretrain
    world, nproc = distributed.launched_world(), distributed.resolve_nproc(settings.nproc)
    if nproc > 1 and world.size == 1:  # start the processes; they join one world and do the work
        check_batch_splits(cfg, nproc)
        log.info("pretrain %s: starting %d processes under torch.distributed.run", cfg.name, nproc)
        distributed.relaunch(nproc, ["tasks", "--root", str(paths.root), "pretrain", cfg.name], f"pretrain {cfg.name}")
        return read_json(paths.pretrain / "log.json")
    device = training_device()
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    with distributed.process_group(world, device):
        return _train(cfg, domain, paths, world, device)


def _train(cfg: DomainConfig, domain: Domain, paths: DomainPaths, world: World, device: torch.device) -> dict[str, Any]:
    domain_name, settings = cfg.name, cfg.pretrain
    check_batch_splits(cfg, world.size)
    torch.use_deterministic_algorithms(True, warn_only=True)
    set_cpu_threads(cfg.cpu_threads)
    keep_freed_memory()  # batches and activations of one size every step: no page faults for each
    seed_everything(settings.seed)  # the same initial weights in every process
    method = domain.build_pretrain_method(cfg, paths.shards).to(device)
    train_rows = domain.pretrain_dataset(paths.shards, "train")
    val_rows = domain.pretrain_dataset(paths.shards, "val")
    if len(train_rows) == 0:
        raise PipelineError(f"no pretraining rows for {domain_name}: the corpus' train split is too small "
                            "for one block; add data or lower preprocess settings")
    held_out = val_rows if len(val_rows) else train_rows
    rankme_rows = [held_out[i] for i in range(min(settings.rankme_samples, len(held_out)))]
    fingerprint = run_fingerprint(cfg, read_record(paths.shards)["outputs_digest"], code_digest(code_files(domain)))
    plan, folder = Plan.of(settings), paths.checkpoints
    logged_steps = plan.logged_steps(settings.checkpoint_every)
    recorder = LineageRecorder(f"pretrain@{domain_name}", paths.pretrain, seeds=[settings.seed], root=paths.root,
                               params={"pretrain": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards])
    step, history = 0, {"loss": [], "checkpoints": [], "rankme_rows": "val" if len(val_rows) else "train"}
    candidates: dict[str, str] = {}  # step -> digest of the kept candidate encoders
    superseded = sort_checkpoints(folder, fingerprint, plan) if world.is_main else None
    distributed.barrier()  # rank 0 has moved aside what no process may load
    state = load_checkpoint(folder, fingerprint, plan, tidy=world.is_main)
    if world.is_main:
        # candidates past the resume point: a superseded plan's (kept aside) or a killed run's (rebuilt)
        prune_candidates(folder, {}, after=state["step"] if state is not None else 0, aside=superseded)
    distributed.barrier()
    trained = wrap_for_world(method, settings, world, device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = make_schedule(optimizer, settings)
    if state is not None:
        load_states(method, optimizer, state, settings)
        scheduler.load_state_dict(state["scheduler"])
        move_schedule_to(scheduler, state["step"])  # this plan's rates (a wsd extension: the new plan's)
        restore_rng_states(state["rng"])
        step, history, candidates = state["step"], state["history"], dict(state["candidates"])
        if world.is_main:
            prune_candidates(folder, candidates)
        log.info("resuming %s pretraining from step %d", domain_name, step)
    workers = distributed.resolve_workers(settings.num_workers, world.size, device.type == "cuda")
    log.info("pretrain %s on %s: %d process(es), %d loader worker(s) each, batch %d", domain_name, device,
             world.size, workers, settings.batch_size)
    # no workers to start when the run is already complete (a re-run resuming from its last checkpoint)
    loader = step_loader(StepBatches(train_rows, method.data_side(), settings, world), step, settings.steps,
                         workers if step < settings.steps else 0, device)
    method.train()
    progress = tqdm(total=settings.steps, initial=step, desc=f"pretrain {domain_name}",
                    disable=None if world.is_main else True)
    pending: list[torch.Tensor] = []  # this process' step losses not yet read back from the device
    for micro_batches in steps_of(loader):
        step_loss = torch.zeros((), device=device)
        for round_, batch in enumerate(micro_batches):
            last_round = round_ == len(micro_batches) - 1
            syncing = last_round or not isinstance(trained, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if syncing else trained.no_sync():
                with autocast(device, settings.precision):
                    loss = trained(move(batch, device)) / len(micro_batches)
                loss.backward()
            step_loss += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pending.append(step_loss)
        progress.update(1)
        logging_checkpoint = step % settings.checkpoint_every == 0 or step == settings.steps
        checkpointing = logging_checkpoint or step == plan.decay_start  # a longer wsd plan resumes there
        if checkpointing or step % settings.log_every == 0:  # the one host sync: losses every log_every steps
            values = distributed.mean_over_processes(torch.stack(pending)).tolist()
            history["loss"].extend([step - len(values) + 1 + i, v] for i, v in enumerate(values))
            pending = []
            progress.set_postfix(loss=f"{history['loss'][-1][1]:.3f}")
        if checkpointing:
            model, optim = model_state(method, settings), optimizer_state(method, optimizer, settings)
            if world.is_main:
                if logging_checkpoint:
                    whole = unsharded(method, model, settings, domain, cfg, paths)
                    _log_checkpoint(history, step, whole, rankme_rows, settings.batch_size,
                                    scheduler.get_last_lr()[0], device)
                    wanted = candidate_steps(logged_steps, settings.keep_candidates, history["checkpoints"])
                    if step in wanted:
                        candidates[str(step)] = save_candidate(folder, step, whole, device, fingerprint)
                    candidates = {s: d for s, d in candidates.items() if int(s) in wanted}
                save_checkpoint(folder, {
                    "step": step, "fingerprint": fingerprint, "history": history, "model": model, "optimizer": optim,
                    "scheduler": scheduler.state_dict(), "rng": rng_states(), "candidates": candidates,
                }, plan, settings.keep_checkpoints)
                prune_candidates(folder, candidates)  # after the checkpoint that no longer names them
            distributed.barrier()
        if step >= settings.steps:
            break  # every batch is consumed: leave the workers to the iterator's clean-up
    progress.close()
    if state is not None and step == state["step"]:  # resumed at the end: the log comes from the checkpoint
        history = state["history"]
    result = dict(history)
    final_state = model_state(method, settings)  # every process takes part under FSDP2
    if world.is_main:
        kept = verified_candidates(folder, candidates)
        rule, reason = choice_rule(settings.checkpoint_choice, settings.method, type(method).checkpoint_rule)
        chosen = choose_checkpoint(rule, history["checkpoints"], set(kept))
        result["choice"] = {"rule": rule, "step": chosen, "reason": reason}
        with atomic_dir(paths.pretrain) as out:
            if rule == "rankme" and chosen in kept:
                shutil.copytree(kept[chosen], out / "encoder")
            else:
                unsharded(method, final_state, settings, domain, cfg, paths).to("cpu").encoder().save(out / "encoder")
            for _, path in sorted(kept.items()):
                shutil.copytree(path, out / "candidates" / path.name)
            write_json(out / "log.json", result)
            recorder.write(out)
        last = history["checkpoints"][-1]
        log.info("pretrain %s: %d steps, loss %.3f, RankMe %.1f; encoder of step %d (%s)", domain_name, step,
                 last["loss"], last["rankme"], chosen, rule)
    return result


def _log_checkpoint(history: dict[str, Any], step: int, method: PretrainMethod,
                    rankme_rows: list[dict[str, Any]], batch_size: int, lr: float, device: torch.device) -> None:
    previous = history["checkpoints"][-1]["step"] if history["checkpoints"] else 0
    window = [loss for s, loss in history["loss"] if s > previous]
    history["checkpoints"].append({"step": step, "loss": float(np.mean(window)),
                                   "rankme": rankme(method, rankme_rows, batch_size, device),
                                   "learning_rate": lr})
