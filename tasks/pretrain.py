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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.device import autocast, move, set_cpu_threads, training_device
from ssl_models.core.distributed import World
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod
from ssl_models.core.rankme import effective_rank
from ssl_models.core.schedules import make_schedule
from tasks.io import atomic_dir, read_json, write_json
from tasks.lineage import LineageRecorder, read_record
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
CHECKPOINT_FORMAT = 2


# Settings that change how fast a run goes, not where it ends: a checkpoint resumes across them
# (on another number of processes or workers, or another machine).
SPEED_ONLY = ("nproc", "num_workers", "precision", "parallel", "compile", "log_every")


def run_fingerprint(cfg: DomainConfig, shards_digest: str) -> str:
    """Identifies the run a checkpoint belongs to: only such checkpoints are resumed."""
    settings = {k: v for k, v in asdict(cfg.pretrain).items() if k not in SPEED_ONLY}
    payload = json.dumps({"checkpoint_format": CHECKPOINT_FORMAT, "pretrain": settings,
                          "model": section_params(cfg.model),
                          "preprocess": section_params(cfg.preprocess), "shards": shards_digest},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def latest_checkpoint(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    for path in sorted(folder.glob("step_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a file cut short by a kill before its rename cannot happen, but be safe
            log.warning("checkpoint %s unreadable, trying an older one", path)
            continue
        if state.get("fingerprint") == fingerprint:
            return state
    return None


def save_checkpoint(folder: Path, state: dict[str, Any], keep: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()


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
    seed_everything(settings.seed)  # the same initial weights in every process
    method = domain.build_pretrain_method(cfg, paths.shards).to(device)
    train_rows = domain.pretrain_dataset(paths.shards, "train")
    val_rows = domain.pretrain_dataset(paths.shards, "val")
    if len(train_rows) == 0:
        raise PipelineError(f"no pretraining rows for {domain_name}: the corpus' train split is too small "
                            "for one block; add data or lower preprocess settings")
    held_out = val_rows if len(val_rows) else train_rows
    rankme_rows = [held_out[i] for i in range(min(settings.rankme_samples, len(held_out)))]
    fingerprint = run_fingerprint(cfg, read_record(paths.shards)["outputs_digest"])
    recorder = LineageRecorder(f"pretrain@{domain_name}", paths.pretrain, seeds=[settings.seed], root=paths.root,
                               params={"pretrain": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards])
    step, history = 0, {"loss": [], "checkpoints": [], "rankme_rows": "val" if len(val_rows) else "train"}
    state = latest_checkpoint(paths.checkpoints, fingerprint)
    if state is None and world.is_main:
        for stale in paths.checkpoints.glob("step_*.pt"):
            stale.unlink()  # from another configuration: never resumed
    distributed.barrier()
    trained = wrap_for_world(method, settings, world, device)
    optimizer = torch.optim.AdamW(method.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = make_schedule(optimizer, settings)
    if state is not None:
        load_states(method, optimizer, state, settings)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        step, history = state["step"], state["history"]
        log.info("resuming %s pretraining from step %d", domain_name, step)
    workers = distributed.resolve_workers(settings.num_workers, world.size)
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
        checkpointing = step % settings.checkpoint_every == 0 or step == settings.steps
        if checkpointing or step % settings.log_every == 0:  # the one host sync: losses every log_every steps
            values = distributed.mean_over_processes(torch.stack(pending)).tolist()
            history["loss"].extend([step - len(values) + 1 + i, v] for i, v in enumerate(values))
            pending = []
            progress.set_postfix(loss=f"{history['loss'][-1][1]:.3f}")
        if checkpointing:
            model, optim = model_state(method, settings), optimizer_state(method, optimizer, settings)
            if world.is_main:
                _log_checkpoint(history, step, unsharded(method, model, settings, domain, cfg, paths), rankme_rows,
                                settings.batch_size, scheduler.get_last_lr()[0], device)
                save_checkpoint(paths.checkpoints, {
                    "step": step, "fingerprint": fingerprint, "history": history, "model": model, "optimizer": optim,
                    "scheduler": scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                            "python": random.getstate()},
                }, settings.keep_checkpoints)
            distributed.barrier()
        if step >= settings.steps:
            break  # every batch is consumed: leave the workers to the iterator's clean-up
    progress.close()
    if state is not None and step == state["step"]:  # resumed at the end: the log comes from the checkpoint
        history = state["history"]
    if world.is_main:
        with atomic_dir(paths.pretrain) as out:
            method = unsharded(method, model_state(method, settings), settings, domain, cfg, paths)
            method.to("cpu").encoder().save(out / "encoder")
            write_json(out / "log.json", history)
            recorder.write(out)
        last = history["checkpoints"][-1]
        log.info("pretrain %s: %d steps, loss %.3f, RankMe %.1f", domain_name, step, last["loss"], last["rankme"])
    elif settings.parallel == "fsdp" and distributed.active():
        model_state(method, settings)  # every process takes part in gathering the full state
    return history


def _log_checkpoint(history: dict[str, Any], step: int, method: PretrainMethod,
                    rankme_rows: list[dict[str, Any]], batch_size: int, lr: float, device: torch.device) -> None:
    previous = history["checkpoints"][-1]["step"] if history["checkpoints"] else 0
    window = [loss for s, loss in history["loss"] if s > previous]
    history["checkpoints"].append({"step": step, "loss": float(np.mean(window)),
                                   "rankme": rankme(method, rankme_rows, batch_size, device),
                                   "learning_rate": lr})
