"""pretrain: the SSL method chosen in params.yaml on the domain's pretraining shards.

The loop is plain: the batch of step `s` is a function of `s` alone (a seeded permutation of the
rows; views and masks from per-sample seeds), built by the method's data side in DataLoader
workers; loss, step, and every `checkpoint_every` steps the loss, RankMe on held-out rows and a
checkpoint holding everything needed to resume exactly (model, optimizer, scheduler, RNG states,
step). A run killed at any moment and re-run ends with the same weights. The run's length is sized
to the corpus once, at the start: `epochs` passes over the train rows, capped at `steps`
(`PretrainConfig.for_corpus`); every later use of `steps` means that planned number.

`pretrain.batch_size` is the global batch. With `nproc > 1` the stage re-starts itself under
`torch.distributed.run`; each process takes its slice of every step's batch and DDP (or FSDP2)
averages the gradients, so the world size changes nothing but speed. Rank 0 writes the
checkpoints and the outputs; a run resumes on any world size.

`train` reads top to bottom: set up, resume, step, checkpoint, finish. What it calls lives beside
it in `tasks/`: the checkpoints, their manifests and fingerprint, and the candidate encoders in
checkpoints.py; the engine (DDP / FSDP2) and the step in parallel.py; the batches in pretrain_data.py.
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.device import set_cpu_threads, training_device
from ssl_models.core.processes import keep_freed_memory
from ssl_models.core.distributed import World
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod
from ssl_models.core.rankme import candidate_steps, choice_rule, choose_checkpoint, effective_rank
from tasks.checkpoints import (
    Plan,
    fingerprint_of,
    prune_candidates,
    restore_rng_states,
    resume_point,
    rng_states,
    save_candidate,
    save_checkpoint,
    seed_everything,
    verified_candidates,
)
from tasks.io import atomic_dir, read_json, write_json
from tasks.lineage import LineageRecorder
from tasks.parallel import Training
from tasks.paths import DomainPaths
from tasks.pretrain_data import StepBatches, step_loader, steps_of

log = logging.getLogger("pretrain")


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
        return train(cfg, domain, paths, world, device)


def train(cfg: DomainConfig, domain: Domain, paths: DomainPaths, world: World, device: torch.device) -> dict[str, Any]:
    """This process' part of the run, from the newest checkpoint of this run (or step 0) to the last step."""
    domain_name, given, folder = cfg.name, cfg.pretrain, paths.checkpoints

    # --- set up: the steps sized to the corpus, the same initial weights in every process
    check_batch_splits(cfg, world.size)
    train_rows, rankme_rows, rankme_split = pretraining_rows(cfg, domain, paths)
    # from here on `steps` is the planned number (`epochs` over the train rows, capped at `steps`)
    settings = given.for_corpus(len(train_rows))
    cfg = copy.copy(cfg)  # not dataclasses.replace: it reads every section, the stage reads only its own
    cfg.pretrain = settings
    if given.epochs is not None:
        log.info("pretrain %s: %g epoch(s) of %d rows at batch %d: %d steps%s (warmup %d)", domain_name, given.epochs,
                 len(train_rows), settings.batch_size, settings.steps,
                 ", pretrain.steps' cap" if settings.steps == given.steps else "", settings.warmup_steps)
    torch.use_deterministic_algorithms(True, warn_only=True)
    set_cpu_threads(cfg.cpu_threads)
    keep_freed_memory()  # batches and activations of one size every step: no page faults for each
    seed_everything(settings.seed)
    rebuild = functools.partial(domain.build_pretrain_method, cfg, paths.shards)
    method = rebuild().to(device)
    fingerprint, plan = fingerprint_of(cfg, domain, paths.shards), Plan.of(settings)
    logged_steps = plan.logged_steps(settings.checkpoint_every)
    recorder = LineageRecorder(f"pretrain@{domain_name}", paths.pretrain, seeds=[settings.seed], root=paths.root,
                               params={"pretrain": asdict(given), "planned_steps": settings.steps,
                                       "model": section_params(cfg.model)},
                               upstream=[paths.shards])
    step, history = 0, {"loss": [], "checkpoints": [], "rankme_rows": rankme_split}
    candidates: dict[str, str] = {}  # step -> digest of the kept candidate encoders

    # --- resume from the newest checkpoint of this run, if there is one
    state = resume_point(folder, fingerprint, plan, world)
    if state is None:
        method.prepare(train_rows)  # what a method fits on the data before training (a resume restores it)
    training = Training.start(method, settings, world, device)
    if state is not None:
        training.resume(state)
        restore_rng_states(state["rng"])
        step, history, candidates = state["step"], state["history"], dict(state["candidates"])
        if world.is_main:
            prune_candidates(folder, candidates)
        log.info("resuming %s pretraining from step %d", domain_name, step)
    history["planned_steps"] = settings.steps  # this plan's, also where a wsd checkpoint of another continues
    workers = distributed.resolve_workers(settings.num_workers, world.size, device.type == "cuda")
    log.info("pretrain %s on %s: %d process(es), %d loader worker(s) each, batch %d", domain_name, device,
             world.size, workers, settings.batch_size)
    # no workers to start when the run is already complete (a re-run resuming from its last checkpoint)
    loader = step_loader(StepBatches(train_rows, method.data_side(), settings, world), step, settings.steps,
                         workers if step < settings.steps else 0, device)
    method.train()
    progress = tqdm(total=settings.steps, initial=step, desc=f"pretrain {domain_name}",
                    disable=None if world.is_main else True)

    # --- step
    pending: list[torch.Tensor] = []  # this process' step losses not yet read back from the device
    for micro_batches in steps_of(loader):
        pending.append(training.step(micro_batches))
        step += 1
        progress.update(1)
        logging_checkpoint = step % settings.checkpoint_every == 0 or step == settings.steps
        checkpointing = logging_checkpoint or step == plan.decay_start  # a longer wsd plan resumes there
        if checkpointing or step % settings.log_every == 0:  # the one host sync: losses every log_every steps
            values = distributed.mean_over_processes(torch.stack(pending)).tolist()
            history["loss"].extend([step - len(values) + 1 + i, v] for i, v in enumerate(values))
            pending = []
            progress.set_postfix(loss=f"{history['loss'][-1][1]:.3f}")

        # --- checkpoint: every process gives its shards, rank 0 logs, keeps candidates and writes
        if checkpointing:
            model, optim = training.model_state(), training.optimizer_state()
            if world.is_main:
                if logging_checkpoint:
                    whole = training.whole(model, rebuild)
                    log_checkpoint(history, step, whole, rankme_rows, settings.batch_size,
                                   training.scheduler.get_last_lr()[0], device)
                    wanted = candidate_steps(logged_steps, settings.keep_candidates, history["checkpoints"])
                    if step in wanted:
                        candidates[str(step)] = save_candidate(folder, step, whole, device, fingerprint)
                    candidates = {s: d for s, d in candidates.items() if int(s) in wanted}
                save_checkpoint(folder, {
                    "step": step, "fingerprint": fingerprint, "history": history, "model": model, "optimizer": optim,
                    "scheduler": training.scheduler.state_dict(), "rng": rng_states(), "candidates": candidates,
                }, plan, settings.keep_checkpoints)
                prune_candidates(folder, candidates)  # after the checkpoint that no longer names them
            distributed.barrier()
        if step >= settings.steps:
            break  # every batch is consumed: leave the workers to the iterator's clean-up
    progress.close()

    # --- finish: the encoder `checkpoint_choice` picks, the candidates, the log and the lineage
    if state is not None and step == state["step"]:  # resumed at the end: the log comes from the checkpoint
        history = state["history"]
    result = dict(history)
    final_state = training.model_state()  # every process takes part under FSDP2
    if world.is_main:
        kept = verified_candidates(folder, candidates)
        rule, reason = choice_rule(settings.checkpoint_choice, settings.method, type(method).checkpoint_rule)
        chosen = choose_checkpoint(rule, history["checkpoints"], set(kept))
        result["choice"] = {"rule": rule, "step": chosen, "reason": reason}
        with atomic_dir(paths.pretrain) as out:
            if rule == "rankme" and chosen in kept:
                shutil.copytree(kept[chosen], out / "encoder")
            else:
                training.whole(final_state, rebuild).to("cpu").encoder().save(out / "encoder")
            for _, path in sorted(kept.items()):
                shutil.copytree(path, out / "candidates" / path.name)
            write_json(out / "log.json", result)
            recorder.write(out)
        last = history["checkpoints"][-1]
        log.info("pretrain %s: %d steps, loss %.3f, RankMe %.1f; encoder of step %d (%s)", domain_name, step,
                 last["loss"], last["rankme"], chosen, rule)
    return result


def check_batch_splits(cfg: DomainConfig, processes: int) -> None:
    """The global batch must split evenly into processes x accumulation rounds."""
    settings = cfg.pretrain
    if settings.batch_size % (processes * settings.grad_accumulation):
        raise PipelineError(f"params.yaml domains.{cfg.name}.pretrain.batch_size {settings.batch_size} must divide "
                            f"by {processes} process(es) x grad_accumulation ({settings.grad_accumulation})")


def pretraining_rows(cfg: DomainConfig, domain: Domain,
                     paths: DomainPaths) -> tuple[Sequence[dict[str, Any]], list[dict[str, Any]], str]:
    """The train rows; the held-out rows RankMe embeds (the first `rankme_samples` of val, or of
    train when val is empty) and the name of the split they come from."""
    settings = cfg.pretrain
    train_rows = domain.pretrain_dataset(paths.shards, "train")
    val_rows = domain.pretrain_dataset(paths.shards, "val")
    if len(train_rows) == 0:
        raise PipelineError(f"no pretraining rows for {cfg.name}: the corpus' train split is too small "
                            "for one block; add data or lower preprocess settings")
    held_out = val_rows if len(val_rows) else train_rows
    rankme_rows = [held_out[i] for i in range(min(settings.rankme_samples, len(held_out)))]
    return train_rows, rankme_rows, "val" if len(val_rows) else "train"


def log_checkpoint(history: dict[str, Any], step: int, method: PretrainMethod,
                   rankme_rows: list[dict[str, Any]], batch_size: int, lr: float, device: torch.device) -> None:
    """Append the checkpoint's log: the mean loss since the previous one, RankMe, the learning rate."""
    previous = history["checkpoints"][-1]["step"] if history["checkpoints"] else 0
    window = [loss for s, loss in history["loss"] if s > previous]
    history["checkpoints"].append({"step": step, "loss": float(np.mean(window)),
                                   "rankme": rankme(method, rankme_rows, batch_size, device),
                                   "learning_rate": lr})


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
