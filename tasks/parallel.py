"""The pretraining method under the chosen engine: as is, DDP or FSDP2, and its whole state
(gathered from the shards under FSDP2) for checkpoints that resume on any world size."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ssl_models.core import distributed
from ssl_models.core.config import DomainConfig, PretrainConfig
from ssl_models.core.distributed import World
from ssl_models.core.domain import Domain
from ssl_models.core.modules import PretrainMethod
from tasks.paths import DomainPaths

log = logging.getLogger("pretrain")


def wrap_for_world(method: PretrainMethod, settings: PretrainConfig, world: World,
                   device: torch.device) -> torch.nn.Module:
    """The module the loop calls: the method itself, or under DDP / FSDP2 with several processes
    (BatchNorm synchronised on GPUs: PyTorch's SyncBatchNorm runs on CUDA only)."""
    if world.size == 1:
        return torch.compile(method) if settings.compile else method
    if device.type == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        log.warning("BatchNorm statistics stay per process on the CPU (SyncBatchNorm needs GPUs)")
    if settings.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(method)
        wrapped: torch.nn.Module = method
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if settings.compile else wrapped


def model_state(method: PretrainMethod, settings: PretrainConfig) -> dict[str, Any]:
    """The whole model's state (gathered from the shards under FSDP2), the same for any world size."""
    if settings.parallel == "fsdp" and distributed.active():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return method.state_dict()


def optimizer_state(method: PretrainMethod, optimizer: torch.optim.Optimizer,
                    settings: PretrainConfig) -> dict[str, Any]:
    if settings.parallel == "fsdp" and distributed.active():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(method, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def unsharded(method: PretrainMethod, state: dict[str, Any], settings: PretrainConfig, domain: Domain,
              cfg: DomainConfig, paths: DomainPaths) -> PretrainMethod:
    """The method with whole tensors: itself, or under FSDP2 a CPU copy holding the gathered state
    (a sharded method runs only when every process calls its forward)."""
    if not (settings.parallel == "fsdp" and distributed.active()):
        return method
    with torch.random.fork_rng(devices=[]):  # building the copy must not move this process' generator
        copy_ = domain.build_pretrain_method(cfg, paths.shards)
    copy_.load_state_dict(state)
    return copy_


def load_states(method: PretrainMethod, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                settings: PretrainConfig) -> None:
    if settings.parallel == "fsdp" and distributed.active():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(method, state["model"], options=options)
        set_optimizer_state_dict(method, optimizer, state["optimizer"], options=options)
        return
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
