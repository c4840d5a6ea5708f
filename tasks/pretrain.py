"""pretrain: the SSL method chosen in params.yaml on the domain's pretraining shards.

The loop is plain: sample a batch, loss, step, and every `checkpoint_every` steps the loss,
RankMe on held-out rows, and a checkpoint holding everything needed to resume exactly
(model, optimizer, scheduler, RNG states, step). The batch order is a function of the step
alone, so a run killed at any moment and re-run ends with the same weights.
"""

from __future__ import annotations

import functools
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

from ssl_models.core.config import DomainConfig, section_params
from ssl_models.core.device import autocast, move, on_cpu, set_cpu_threads, training_device
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import PretrainMethod, sample_seeds
from ssl_models.core.rankme import effective_rank
from ssl_models.core.schedules import make_schedule
from tasks.io import atomic_dir, write_json
from tasks.lineage import LineageRecorder, read_record
from tasks.paths import DomainPaths

log = logging.getLogger("pretrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> list[int]:
    """Rows of batch `step`: a seeded permutation per epoch over a flat stream of rows,
    so the data position is a function of the step alone."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_rows)
        indices.append(_epoch_order(n_rows, seed, epoch)[offset])
    return indices


# Bumped when the layout of a checkpoint's state changes: a checkpoint of another format is never resumed.
# 2: methods own their encoder (`backbone_encoder.*` state keys); views and masks from per-sample seeds.
CHECKPOINT_FORMAT = 2


def run_fingerprint(cfg: DomainConfig, shards_digest: str) -> str:
    """Identifies the run a checkpoint belongs to: only such checkpoints are resumed."""
    payload = json.dumps({"checkpoint_format": CHECKPOINT_FORMAT, "pretrain": asdict(cfg.pretrain),
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
    was_training = method.training
    method.eval()
    with on_cpu(method, device):
        features = torch.cat([method.embed(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])
    method.train(was_training)
    return effective_rank(features.float())


def pretrain(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> dict[str, Any]:
    domain_name = cfg.name
    settings = cfg.pretrain
    torch.use_deterministic_algorithms(True, warn_only=True)
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(settings.seed)
    device = training_device()
    method = domain.build_pretrain_method(cfg, paths.shards).to(device)
    data_side = method.data_side()
    train_rows = domain.pretrain_dataset(paths.shards, "train")
    val_rows = domain.pretrain_dataset(paths.shards, "val")
    if len(train_rows) == 0:
        raise PipelineError(f"no pretraining rows for {domain_name}: the corpus' train split is too small "
                            "for one block; add data or lower preprocess settings")
    held_out = val_rows if len(val_rows) else train_rows
    rankme_rows = [held_out[i] for i in range(min(settings.rankme_samples, len(held_out)))]
    optimizer = torch.optim.AdamW(method.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = make_schedule(optimizer, settings)
    fingerprint = run_fingerprint(cfg, read_record(paths.shards)["outputs_digest"])
    recorder = LineageRecorder(f"pretrain@{domain_name}", paths.pretrain, seeds=[settings.seed], root=paths.root,
                               params={"pretrain": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards])
    step, history = 0, {"loss": [], "checkpoints": [], "rankme_rows": "val" if len(val_rows) else "train"}
    state = latest_checkpoint(paths.checkpoints, fingerprint)
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        step, history = state["step"], state["history"]
        log.info("resuming %s pretraining from step %d", domain_name, step)
    else:
        for stale in paths.checkpoints.glob("step_*.pt"):
            stale.unlink()  # from another configuration: never resumed
    log.info("pretrain %s on %s", domain_name, device)
    method.train()
    progress = tqdm(total=settings.steps, initial=step, desc=f"pretrain {domain_name}", disable=None)
    while step < settings.steps:
        rows = [train_rows[i] for i in batch_indices(step, settings.batch_size, len(train_rows), settings.seed)]
        # views, masks and crops draw from per-sample seeds of (seed, step, position in the batch)
        batch = data_side(rows, sample_seeds(settings.seed, step, range(len(rows))))
        with autocast(device):
            loss = method(move(batch, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["loss"].append([step, loss.item()])
        progress.update(1)
        progress.set_postfix(loss=f"{history['loss'][-1][1]:.3f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _log_checkpoint(history, step, method, rankme_rows, settings.batch_size, scheduler.get_last_lr()[0],
                            device)
            save_checkpoint(paths.checkpoints, {
                "step": step, "fingerprint": fingerprint, "history": history,
                "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            }, settings.keep_checkpoints)
    progress.close()
    with atomic_dir(paths.pretrain) as out:
        method.to("cpu").encoder().save(out / "encoder")
        write_json(out / "log.json", history)
        recorder.write(out)
    last = history["checkpoints"][-1]
    log.info("pretrain %s: %d steps, loss %.3f, RankMe %.1f", domain_name, step, last["loss"], last["rankme"])
    return history


def _log_checkpoint(history: dict[str, Any], step: int, method: PretrainMethod,
                    rankme_rows: list[dict[str, Any]], batch_size: int, lr: float, device: torch.device) -> None:
    previous = history["checkpoints"][-1]["step"] if history["checkpoints"] else 0
    window = [loss for s, loss in history["loss"] if s > previous]
    history["checkpoints"].append({"step": step, "loss": float(np.mean(window)),
                                   "rankme": rankme(method, rankme_rows, batch_size, device),
                                   "learning_rate": lr})
