"""Pretraining batches as a function of the step: which rows, and the loader that builds them.

The batch of step `s` is a seeded permutation's slice at `s` (one permutation per epoch), cut
into this process' micro-batches and built by the method's data side (views and masks from
per-sample seeds), in DataLoader workers. Any number of workers or processes gives the same
batches.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ssl_models.core.config import PretrainConfig
from ssl_models.core.distributed import World
from ssl_models.core.modules import DataSide, sample_seeds


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


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this process' micro-batches of step `step`, built by the data side.

    The step's global batch has positions 0..batch_size-1; micro-batch `a` of rank `r` holds
    positions `(a * world + r) * micro` onwards, so the ranks of one accumulation round hold
    consecutive positions in rank order (the order in which a gathering loss concatenates
    them). Picklable: DataLoader workers build items, in any number, with the same result."""

    def __init__(self, rows: Any, data_side: DataSide, settings: PretrainConfig, world: World) -> None:
        self.rows, self.data_side, self.world = rows, data_side, world
        self.seed, self.batch_size, self.rounds = settings.seed, settings.batch_size, settings.grad_accumulation
        self.micro = settings.batch_size // (world.size * settings.grad_accumulation)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = batch_indices(step, self.batch_size, len(self.rows), self.seed)
        batches = []
        for round_ in range(self.rounds):
            first = (round_ * self.world.size + self.world.rank) * self.micro
            positions = range(first, first + self.micro)
            batches.append(self.data_side([self.rows[indices[p]] for p in positions],
                                          sample_seeds(self.seed, step, positions)))
        return batches


def step_loader(dataset: StepBatches, first_step: int, last_step: int, workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The steps' batches in order, built `workers` processes ahead (pinned for a GPU)."""
    # its own generator: a loader draws its workers' base seed when iterated, which must not shift
    # torch's global generator (dropout draws from it, and a resumed run restores it)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(first_step, last_step),
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(dataset.seed))


def steps_of(loader: Any) -> Any:
    """The loader's items as one step's micro-batches at a time (an item may carry several steps)."""
    yield from loader
