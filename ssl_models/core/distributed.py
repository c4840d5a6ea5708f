"""Several training processes with torch.distributed: which one this is, how a stage starts
them, and the collectives a loss needs so that the world size changes nothing but speed.

A stage started with `nproc > 1` re-starts itself under `torch.distributed.run` (one process
per GPU, or per CPU share with the gloo backend); a stage started by an outside `torchrun` or
`srun torchrun` (several nodes, c10d rendezvous) finds RANK and WORLD_SIZE set and joins that
world. Nothing here is home-made: launch, rendezvous, all-reduce and the autograd all-gather
are PyTorch's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssl_models.core.errors import PipelineError
from ssl_models.core.processes import available_cores


@dataclass(frozen=True)
class World:
    """This process' place among the training processes (1 process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The world torchrun (or srun + torchrun) started this process in, from its environment."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def uses_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("SSL_PIPELINE_DEVICE", "auto") in ("auto", "cuda")


def resolve_nproc(setting: int | str) -> int:
    """`auto`: one process per visible GPU, one on the CPU."""
    if setting == "auto":
        return max(1, torch.cuda.device_count()) if uses_cuda() else 1
    return int(setting)


def resolve_workers(setting: int | str, nproc: int, on_gpu: bool) -> int:
    """`auto`: loader workers from the CPU cores the training processes of this node leave free,
    at most 4 each. A process stepping a GPU keeps one core and gets at least 1 worker, so batches
    are built while the GPU steps. A process training on the CPU keeps a core per torch thread;
    where its threads take every core, a worker would only take cores from the step (a ~2-3 ms
    batch in a worker slowed a two-thread ~15 ms step by a fifth on 2 cores), so it gets 0 and
    builds each batch between steps."""
    if setting != "auto":
        return int(setting)
    cores = available_cores()
    per_process = cores // int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
    if on_gpu:
        return max(1, min(4, per_process - 1))
    return max(0, min(4, per_process - torch.get_num_threads()))


def relaunch(nproc: int, argv: list[str], what: str) -> None:
    """Run `python -m <argv>` as `nproc` processes on this node under torch.distributed.run;
    `what` names the work in the one line a failure prints."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", *argv]
    finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if finished.returncode != 0:
        raise PipelineError(f"{what} with {nproc} processes failed (exit code {finished.returncode}); "
                            "the processes' own messages are above")


def die_with_launcher() -> None:
    """On Linux, have the kernel kill this training process when its launcher (torchrun's agent)
    dies: torchrun starts each process in a session of its own, so a SIGKILL of the stage's
    process group would otherwise leave them training and writing checkpoints beside a re-run."""
    import signal

    from ssl_models.core.processes import parent_death_signal

    parent_death_signal(signal.SIGKILL)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The default process group for `world` (NCCL on GPUs, gloo on the CPU), torn down after."""
    if world.size == 1:
        yield
        return
    die_with_launcher()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    except BaseException:
        # no barrier: a process stopped by an error or a cancel (SIGTERM from torchrun or the stage)
        # would wait there for ranks that are stopping elsewhere, or mid-collective, until the timeout
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor | float) -> torch.Tensor:
    """The mean over every process' samples of a loss summed over this process' `local_count`
    items (masked tokens, frames): `local_sum * world / total_count`. DDP averages gradients over
    the processes, so the gradient is that of the mean over the whole global batch, whatever
    the split of items between processes."""
    count = torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device)
    if not active():
        return local_sum / count.clamp(min=1)
    total = count.detach().clone()
    dist.all_reduce(total)
    return local_sum * world_size() / total.clamp(min=1)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process' `tensor` concatenated along dim 0 in rank order, with gradients flowing
    back to each process' own part (torch.distributed.nn's autograd all-gather)."""
    if not active():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the processes (for logging: no gradient)."""
    if not active():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / world_size()


def barrier() -> None:
    if active():
        dist.barrier()
