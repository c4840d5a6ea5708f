"""The pretraining method under the chosen engine: as is, DDP or FSDP2, optionally with its
backbone's blocks recomputed in backward (activation checkpointing), and its whole state
(gathered from the shards under FSDP2) for checkpoints that resume on any world size."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
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
    (BatchNorm synchronised on GPUs: PyTorch's SyncBatchNorm runs on CUDA only); with
    `activation_checkpointing` its encoder's repeated blocks are recomputed in backward, on any
    world size. Under FSDP2 each block is a unit of its own, then the rest of the method (the
    order torchtitan uses: checkpointing, then `fully_shard` of each block, then of the root)."""
    if world.size > 1 and device.type == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif world.size > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        log.warning("BatchNorm statistics stay per process on the CPU (SyncBatchNorm needs GPUs)")
    blocks = method.encoder().repeated_blocks()
    if settings.activation_checkpointing:
        blocks = checkpoint_blocks(method, blocks)
        log.info("activation checkpointing: %d block(s) recomputed in backward", len(blocks))
    if world.size == 1:
        wrapped: torch.nn.Module = method
    elif settings.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(method)
        wrapped = method
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if settings.compile else wrapped


def checkpoint_blocks(method: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Replace each of `blocks` inside `method` by torch's non-reentrant `checkpoint_wrapper`: its
    activations are not kept for backward but recomputed there, with the RNG state of the forward
    (dropout draws the same masks), so gradients and weights are those of the plain run. The
    wrapper's state-dict hooks drop its `_checkpoint_wrapped_module.` prefix: state_dict keys,
    saved encoders and checkpoints are the same with and without it. Returns the wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    wanted, wrappers = {id(block) for block in blocks}, []
    for parent in list(method.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                options: dict[str, Any] = {}
                if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in child.modules()):
                    options["context_fn"] = functools.partial(_batch_norm_contexts, child)
                wrapper = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **options)
                parent.register_module(name, wrapper)
                wrappers.append(wrapper)
                wanted.discard(id(child))
    return wrappers


def _batch_norm_contexts(block: torch.nn.Module) -> tuple[contextlib.AbstractContextManager,
                                                         contextlib.AbstractContextManager]:
    """(forward, recomputation) contexts for a block with BatchNorm: the recomputation in backward
    would update the running statistics a second time (PyTorch's checkpoint docs warn of it),
    so they are put back as the forward left them."""
    return contextlib.nullcontext(), _running_stats_kept(block)


@contextlib.contextmanager
def _running_stats_kept(block: torch.nn.Module) -> Iterator[None]:
    norms = [m for m in block.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for current, before in zip((m.running_mean, m.running_var, m.num_batches_tracked), buffers):
                    current.copy_(before)


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
