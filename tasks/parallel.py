"""The pretraining method under the chosen engine: as is, DDP or FSDP2, optionally with its
backbone's blocks recomputed in backward (activation checkpointing); the training step the stage's
loop and benchmarks/throughput.py both run; and the whole state (gathered from the shards under
FSDP2) for checkpoints that resume on any world size."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ssl_models.core import distributed
from ssl_models.core.config import PretrainConfig
from ssl_models.core.device import autocast, fused_adamw, move
from ssl_models.core.distributed import World
from ssl_models.core.modules import PretrainMethod
from ssl_models.core.schedules import make_schedule, move_schedule_to

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


@dataclass
class Training:
    """What an optimizer step touches, set up once from the config: `method` (its parameters and
    state are the run's), `module` (what the step calls: `method` under the chosen engine, see
    `wrap_for_world`), AdamW and the schedule. `sharded`: under FSDP2 with several processes, its
    states are gathered whole to be saved and loaded whole, so that they are the same for any world size."""

    method: PretrainMethod
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: str
    device: torch.device
    sharded: bool

    @classmethod
    def start(cls, method: PretrainMethod, settings: PretrainConfig, world: World, device: torch.device) -> Training:
        module = wrap_for_world(method, settings, world, device)  # before AdamW: FSDP2 swaps the parameters
        optimizer = torch.optim.AdamW(method.parameters(), lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay, fused=fused_adamw(device))
        return cls(method, module, optimizer, make_schedule(optimizer, settings), settings.precision, device,
                   settings.parallel == "fsdp" and distributed.active())

    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step on a step's micro-batches (gradient accumulation rounds): forward and
        backward of each, the gradients averaged over processes only after the last one (DDP's
        `no_sync` before: one all-reduce a step), clipping, AdamW, the schedule. Returns the step's
        loss on the device (reading it back would wait for the device)."""
        step_loss = torch.zeros((), device=self.device)
        for round_, batch in enumerate(micro_batches):
            last_round = round_ == len(micro_batches) - 1
            syncing = last_round or not isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if syncing else self.module.no_sync():
                with autocast(self.device, self.precision):
                    loss = self.module(move(batch, self.device)) / len(micro_batches)
                loss.backward()
            step_loss += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(self.method.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def model_state(self) -> dict[str, Any]:
        """The whole model's state (gathered from the shards under FSDP2), the same for any world size."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        return self.method.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            return get_optimizer_state_dict(self.method, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def resume(self, state: dict[str, Any]) -> None:
        """Model, optimizer and schedule as a checkpoint's `state` holds them; the schedule's rates
        are this run's plan's (a wsd extension: the new plan's)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.method, state["model"], options=options)
            set_optimizer_state_dict(self.method, self.optimizer, state["optimizer"], options=options)
        else:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        move_schedule_to(self.scheduler, state["step"])

    def whole(self, model_state: dict[str, Any], build: Callable[[], PretrainMethod]) -> PretrainMethod:
        """The method with whole tensors: itself, or under FSDP2 a CPU copy that `build` makes,
        holding `model_state` (a sharded method runs only when every process calls its forward)."""
        if not self.sharded:
            return self.method
        with torch.random.fork_rng(devices=[]):  # building the copy must not move this process' generator
            copy_ = build()
        copy_.load_state_dict(model_state)
        return copy_
