"""Pretraining batches as a function of the step: which rows, and the loader that builds them.

The batch of step `s` is a seeded permutation's slice at `s` (one permutation per epoch), cut
into this process' micro-batches and built by the method's data side (views and masks from
per-sample seeds), in DataLoader workers or, with none, in the training process. Any number of
workers or processes gives the same batches.

A loader item carries `steps_per_item` consecutive steps, built one after the other. Handing an
item from a worker to the training process costs the training process ~0.5 ms per tensor (each
storage travels as its own shared-memory file, fetched from the worker in a round trip) and the
freeing of its memory, so a worker's item stacks each field of its steps into one tensor
[steps, ...], puts all of them in one shared buffer, and `steps_of` hands out views of it, one
step at a time. Without workers the steps are built back to back and kept as
they are: data code run between two training steps costs 2-3x what it costs in a tight loop (the
step has churned the caches), so once per item instead of once per step. The grouping changes
nothing but speed: the batch of step `s` is the same for any `steps_per_item`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
        self.steps_per_item = settings.steps_per_item  # read by step_loader

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = batch_indices(step, self.batch_size, len(self.rows), self.seed)
        batches = []
        for round_ in range(self.rounds):
            first = (round_ * self.world.size + self.world.rank) * self.micro
            positions = range(first, first + self.micro)
            batches.append(self.data_side(take_rows(self.rows, [indices[p] for p in positions]),
                                          sample_seeds(self.seed, step, positions)))
        return batches


def take_rows(rows: Any, indices: list[int]) -> list[dict[str, Any]]:
    """`[rows[i] for i in indices]`, in one read where the rows offer it: a `datasets.Dataset`
    decodes a micro-batch of Arrow rows (its `__getitems__`) ~3-4x faster than row by row (a
    larger read is no faster per row, and holds more memory at once)."""
    getitems = getattr(rows, "__getitems__", None)
    return getitems(indices) if getitems is not None else [rows[i] for i in indices]


# `steps_per_item: auto` gives an item about this many of the process' rows (all its micro-batches of
# each step counted): 8 steps of a 32-row batch, 1 step of 256 rows or more. A step of a few rows is
# built and trained in milliseconds, where the ~2 ms hand-over of an item (or, without workers, the
# cold start of the data code) weighs most; a step of hundreds of rows takes long enough to hide it.
# Capped so that items in flight (workers x prefetch x steps) stay a few batches' memory.
ROWS_PER_ITEM, MAX_AUTO_STEPS_PER_ITEM = 256, 16


def resolve_steps_per_item(setting: int | str, rows_per_step: int) -> int:
    """Steps per loader item: the setting, or for `auto` enough steps for ~ROWS_PER_ITEM rows."""
    if setting != "auto":
        return int(setting)
    return max(1, min(MAX_AUTO_STEPS_PER_ITEM, math.ceil(ROWS_PER_ITEM / max(1, rows_per_step))))


class StepItems(torch.utils.data.Sampler):
    """The loader's batch sampler: item i holds steps [first + i*k, first + (i+1)*k), the last
    one cut at `last_step` (lazy: a run of a million steps holds no list of them)."""

    def __init__(self, first_step: int, last_step: int, steps_per_item: int) -> None:
        self.first, self.last, self.k = first_step, last_step, steps_per_item

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.first, self.last, self.k):
            yield list(range(start, min(start + self.k, self.last)))

    def __len__(self) -> int:
        return len(range(self.first, self.last, self.k))


def _stacked(values: Sequence[Any]) -> Any:
    """One step-indexed value for the same field of several steps: a tensor [steps, ...] when every
    step's is a tensor of one shape and dtype, a dict of such when they are plain dicts with the
    same keys, else the list of the steps' values (ragged shapes, strings...)."""
    first = values[0]
    if isinstance(first, torch.Tensor) and all(
            isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values):
        return first.unsqueeze(0) if len(values) == 1 else torch.stack(list(values))  # one step: a view, no copy
    if type(first) is dict and all(type(v) is dict and v.keys() == first.keys() for v in values):
        return {key: _stacked([v[key] for v in values]) for key in first}
    return list(values)


def _step_of(value: Any, index: int) -> Any:
    """Step `index`'s value out of `_stacked`: a view of a stacked tensor (no copy) or a list entry."""
    if type(value) is dict:
        return {key: _step_of(v, index) for key, v in value.items()}
    return value[index]


@dataclass(frozen=True)
class _Packed:
    """Where a tensor of a worker's item lies in the item's one shared buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        return buffer[self.offset:self.offset + nbytes].view(self.dtype).view(self.shape)


def _in_one_buffer(value: Any) -> tuple[Any, torch.Tensor]:
    """`value` with each tensor in it replaced by a `_Packed`, and the shared-memory buffer that
    holds them all (64-byte aligned): each storage travels from a worker as a file descriptor of
    its own, fetched from the worker in a round trip (~0.5 ms each), so an item is one storage."""
    tensors: list[tuple[_Packed, torch.Tensor]] = []
    size = 0

    def placed(v: Any) -> Any:
        nonlocal size
        if isinstance(v, torch.Tensor):
            tensors.append((_Packed(size, v.dtype, tuple(v.shape)), v))
            size += -(-v.numel() * v.element_size() // 64) * 64
            return tensors[-1][0]
        if type(v) is dict:
            return {key: placed(x) for key, x in v.items()}
        if type(v) is list:
            return [placed(x) for x in v]
        return v

    layout = placed(value)
    buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
    for packed, tensor in tensors:
        packed.view(buffer).copy_(tensor)
    return layout, buffer


def _unpacked(value: Any, buffer: torch.Tensor) -> Any:
    """`_in_one_buffer`'s layout with its tensors back, as views of the buffer."""
    if isinstance(value, _Packed):
        return value.view(buffer)
    if type(value) is dict:
        return {key: _unpacked(x, buffer) for key, x in value.items()}
    if type(value) is list:
        return [_unpacked(x, buffer) for x in value]
    return value


def pack_steps(steps: list[list[Any]]) -> dict[str, Any]:
    """A worker's loader item: consecutive steps' micro-batches, each field stacked over the steps,
    every tensor in one shared buffer (`steps_of` takes them out again)."""
    layout, buffer = _in_one_buffer([_stacked([step[a] for step in steps]) for a in range(len(steps[0]))])
    return {"steps": len(steps), "rounds": layout, "buffer": buffer}


def keep_steps(steps: list[list[Any]]) -> dict[str, Any]:
    """A loader item built in the training process: the steps' micro-batches as they are (nothing
    is handed over, so nothing is gained by stacking them)."""
    return {"steps": len(steps), "built": steps}


def prefetch_factor(steps_per_item: int, workers: int) -> int | None:
    """Items in flight per worker: two when an item holds several steps, four when it holds one."""
    return (4 if steps_per_item == 1 else 2) if workers else None


def step_loader(dataset: StepBatches, first_step: int, last_step: int, workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """Steps `first_step`..`last_step - 1` in items of `steps_per_item` steps, built `workers`
    processes ahead (pinned for a GPU) or, with 0, by the training process; `steps_of` gives
    them back one step at a time."""
    steps_per_item = resolve_steps_per_item(dataset.steps_per_item, dataset.micro * dataset.rounds)
    # its own generator: a loader draws its workers' base seed when iterated, which must not shift
    # torch's global generator (dropout draws from it, and a resumed run restores it)
    return torch.utils.data.DataLoader(dataset, batch_sampler=StepItems(first_step, last_step, steps_per_item),
                                       collate_fn=pack_steps if workers else keep_steps, num_workers=workers,
                                       pin_memory=device.type == "cuda",
                                       prefetch_factor=prefetch_factor(steps_per_item, workers),
                                       generator=torch.Generator().manual_seed(dataset.seed))


def steps_of(loader: Iterable[dict[str, Any]]) -> Iterator[list[Any]]:
    """The loader's items as one step's micro-batches at a time, in step order. The loader is
    never asked for an item past its last (`len`): that request shuts its workers down inside
    `next`, where a worker's exit status at shutdown (1, seen inside long pytest processes)
    raises; the workers go when the loader is dropped instead."""
    items = iter(loader)
    for _ in range(len(loader)):
        item = next(items)
        rounds = _unpacked(item["rounds"], item["buffer"]) if "buffer" in item else None
        for index in range(item["steps"]):
            yield item["built"][index] if rounds is None else [_step_of(round_, index) for round_ in rounds]
