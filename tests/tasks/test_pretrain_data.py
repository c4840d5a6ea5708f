"""Loader items of several steps (`pretrain.steps_per_item`) change nothing but speed: every step
gets the same micro-batches for any steps per item and any number of workers, also from a resumed
start in the middle of an item and through a short last item."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from ssl_models.core.config import PretrainConfig
from ssl_models.core.distributed import World, resolve_workers
from ssl_models.core.modules import DataSide, generator
from tasks.pretrain_data import (
    ROWS_PER_ITEM,
    StepBatches,
    StepItems,
    resolve_steps_per_item,
    step_loader,
    steps_of,
)

CPU = torch.device("cpu")


class NoisyViews(DataSide):
    """A data side with the shapes real ones give: a float view drawn from each sample's seed, an
    integer mask, a nested dict, a field whose length varies from step to step (ragged across the
    steps of an item, so it cannot be stacked) and a non-tensor field."""

    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
        values = torch.stack([row["value"] for row in rows])
        noise = torch.stack([torch.randn(3, generator=generator(seed)) for seed in seeds])
        kept = torch.stack([torch.randperm(5, generator=generator(seed))[:2] for seed in seeds])
        ragged = torch.arange(int(values[0, 0]) % 3 + 1)
        return {"view": values + noise, "kept": kept, "targets": {"clean": values.clone()},
                "ragged": ragged, "names": [row["name"] for row in rows]}


def rows(n: int = 10) -> list[dict[str, Any]]:
    return [{"value": torch.full((3,), float(i)), "name": f"row{i}"} for i in range(n)]


def dataset(steps_per_item: int | str, world: World | None = None, **settings: Any) -> StepBatches:
    config = PretrainConfig(batch_size=4, steps_per_item=steps_per_item, seed=7, **settings)
    return StepBatches(rows(), NoisyViews(), config, world or World())


def assert_same_batch(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_batch(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and a and isinstance(a[0], (torch.Tensor, dict, list)):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_batch(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def loaded_steps(data: StepBatches, first: int, last: int, workers: int) -> list[Any]:
    return list(steps_of(step_loader(data, first, last, workers, CPU)))


def test_items_cover_the_steps_in_order_from_any_start_with_a_short_last_item() -> None:
    assert list(StepItems(4, 11, 3)) == [[4, 5, 6], [7, 8, 9], [10]] and len(StepItems(4, 11, 3)) == 3
    assert list(StepItems(0, 2, 8)) == [[0, 1]]
    assert list(StepItems(5, 5, 3)) == [] and len(StepItems(5, 5, 3)) == 0


def test_auto_steps_per_item_fills_an_item_with_rows() -> None:
    assert resolve_steps_per_item("auto", 32) == ROWS_PER_ITEM // 32
    assert resolve_steps_per_item("auto", 10 * ROWS_PER_ITEM) == 1
    assert resolve_steps_per_item("auto", 1) > 1  # capped, not ROWS_PER_ITEM steps
    assert resolve_steps_per_item(3, 32) == 3


def test_auto_workers_take_the_cores_the_training_threads_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a worker beside training threads that already take every core only takes cores
    from the step: 0 then; a GPU process keeps one core and gets at least one worker."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert resolve_workers("auto", 1, on_gpu=False) == 0
        assert resolve_workers("auto", 1, on_gpu=True) == 4  # capped
        torch.set_num_threads(2)
        assert resolve_workers("auto", 1, on_gpu=False) == 4  # 6 free cores, capped
        torch.set_num_threads(1)
        assert resolve_workers("auto", 4, on_gpu=False) == 1  # 2 cores per process
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's processes on this node, not the world
        assert resolve_workers("auto", 16, on_gpu=False) == 0 and resolve_workers("auto", 16, on_gpu=True) == 1
        assert resolve_workers(3, 1, on_gpu=False) == 3
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("first", [0, 4])  # 4: a run resumed at a step inside the k=3 grid from 0
def test_every_steps_per_item_gives_each_step_its_own_batch(first: int) -> None:
    last = 11  # k=3 from 4 ends with a one-step item; auto (8 here) with a short one too
    reference = [dataset(1)[step] for step in range(first, last)]
    for steps_per_item in (1, 3, "auto"):
        got = loaded_steps(dataset(steps_per_item), first, last, workers=0)
        assert len(got) == last - first
        for step, (want, have) in enumerate(zip(reference, got), start=first):
            assert_same_batch(want, have, f"k={steps_per_item} step {step}")


def test_workers_and_items_of_several_steps_give_the_batches_of_one_process() -> None:
    """2 workers, 3 steps per item, 2 accumulation rounds, rank 1 of 2: the same micro-batches as
    building each step in this process."""
    world = World(rank=1, size=2)
    reference = [dataset(1, world, grad_accumulation=2)[step] for step in range(2, 9)]
    for steps_per_item, workers in ((3, 2), ("auto", 2), (1, 1)):
        got = loaded_steps(dataset(steps_per_item, world, grad_accumulation=2), 2, 9, workers)
        assert len(got) == len(reference)
        for step, (want, have) in enumerate(zip(reference, got), start=2):
            assert len(have) == 2  # both accumulation rounds
            assert_same_batch(want, have, f"k={steps_per_item} workers={workers} step {step}")


def test_a_step_of_an_item_is_a_view_not_a_copy() -> None:
    """A worker's item has its fields stacked and handed out as views of one buffer (the point:
    one shared-memory storage per item, not one per field and step)."""
    first, second = loaded_steps(dataset(2), 0, 2, workers=1)
    storage = first[0]["view"].untyped_storage().data_ptr()
    assert second[0]["view"].untyped_storage().data_ptr() == storage
    assert first[0]["kept"].untyped_storage().data_ptr() == storage  # another field, another dtype
    assert first[0]["targets"]["clean"].untyped_storage().data_ptr() == storage
    assert first[0]["view"].is_contiguous() and first[0]["kept"].dtype == torch.int64


@pytest.mark.slow
def test_the_stage_ends_with_the_same_weights_for_any_workers_and_steps_per_item(tmp_path: Any) -> None:
    """The real pretrain stage: batches built inline one step at a time, or by 2 workers in items
    of 2 steps (the last one short): bit-identical weights."""
    from tests.conftest import pretrained_state, run_stages, tiny_params, write_params

    # no labels: pretraining needs none, and the label checks of ingest need a bigger corpus
    write_params(tmp_path, tiny_params(cpu_threads=1, labels=None, default_data={"max_files": 24}))
    run_stages(tmp_path, "legal", "default_data", "ingest", "preprocess")
    short = {"steps": 3, "checkpoint_every": 3, "warmup_steps": 0}
    inline, _ = pretrained_state(tmp_path, "legal", num_workers=0, steps_per_item=1, **short)
    bundled, _ = pretrained_state(tmp_path, "legal", num_workers=2, steps_per_item=2, **short)
    assert inline.keys() == bundled.keys()
    for name in inline:
        assert torch.equal(inline[name], bundled[name]), name
