"""Learning-rate schedules, from transformers: cosine, warmup-stable-decay, constant."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_wsd_schedule

from ssl_models.core.config import PretrainConfig


def make_schedule(optimizer: Optimizer, cfg: PretrainConfig) -> LambdaLR:
    """`wsd` (warmup-stable-decay, Hu et al. "MiniCPM" 2024) keeps the rate flat so continued
    pretraining can be extended and decayed at any point; `cosine` is the usual default."""
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "wsd":
        decay = max(1, math.ceil(cfg.decay_fraction * cfg.steps))
        return get_wsd_schedule(optimizer, cfg.warmup_steps, num_decay_steps=decay,
                                num_training_steps=cfg.steps)
    return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
