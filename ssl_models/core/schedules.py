"""Learning-rate schedules, from transformers: cosine, warmup-stable-decay, constant."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_wsd_schedule

from ssl_models.core.config import PretrainConfig


def decay_steps(cfg: PretrainConfig) -> int:
    """wsd: the steps spent decaying at the end of the plan (at least one)."""
    return max(1, math.ceil(cfg.decay_fraction * cfg.steps))


def decay_start(cfg: PretrainConfig) -> int | None:
    """wsd: the step at which the decay begins. The rate of every step before it depends on
    `warmup_steps` alone, not on `steps`: a checkpoint taken at or before it is a checkpoint of
    any longer (or shorter) plan whose decay starts no earlier. None for the other schedules."""
    return cfg.steps - decay_steps(cfg) if cfg.schedule == "wsd" else None


def make_schedule(optimizer: Optimizer, cfg: PretrainConfig) -> LambdaLR:
    """`wsd` (warmup-stable-decay, Hu et al. "MiniCPM" 2024) keeps the rate flat so continued
    pretraining can be extended and decayed at any point; `cosine` is the usual default."""
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "wsd":
        return get_wsd_schedule(optimizer, cfg.warmup_steps, num_decay_steps=decay_steps(cfg),
                                num_training_steps=cfg.steps)
    return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)


def move_schedule_to(scheduler: LambdaLR, step: int) -> None:
    """Put `scheduler` (and its optimizer's rates) where its own plan stands after `step` steps,
    whatever plan the loaded state came from: a wsd run extended from a stable-phase checkpoint
    continues on the new plan's rates. The same expression LambdaLR uses, so the rates are
    bit-identical to a run that took those steps on this plan."""
    scheduler.last_epoch = step
    rates = [base * schedule(step) for schedule, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    scheduler._last_lr = rates
