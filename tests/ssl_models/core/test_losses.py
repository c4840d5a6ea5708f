"""The Barlow Twins loss is the same for one process holding a batch and two gloo processes
holding half of it each: loss and (DDP-averaged) gradients; lightly's own gathered loss is not."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import BarlowTwinsLoss

from ssl_models.core.losses import GlobalBarlowTwinsLoss

BATCH, DIM, OUT = 16, 6, 5


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(BATCH, DIM, generator=generator), torch.randn(BATCH, DIM, generator=generator)
    return x_a, x_a + 0.3 * x_b, torch.randn(OUT, DIM, generator=generator)


def _loss_and_grad(loss_fn: torch.nn.Module, rows: slice) -> tuple[float, torch.Tensor]:
    x_a, x_b, weight = _inputs()
    weight.requires_grad_(True)
    loss = loss_fn(x_a[rows] @ weight.T, x_b[rows] @ weight.T)
    loss.backward()
    return loss.item(), weight.grad


def _worker(rank: int, port: int, lightly: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = BATCH // 2
        loss_fn = BarlowTwinsLoss(gather_distributed=True) if lightly else GlobalBarlowTwinsLoss()
        loss, grad = _loss_and_grad(loss_fn, slice(rank * half, (rank + 1) * half))
        dist.all_reduce(grad)  # what DistributedDataParallel does to a parameter's gradient
        grad /= 2
        if rank == 0:
            torch.save({"loss": loss, "grad": grad}, out)
    finally:
        dist.destroy_process_group()


def _two_processes(tmp_path: Path, lightly: bool) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / f"{'lightly' if lightly else 'global'}.pt"
    mp.start_processes(_worker, args=(port, lightly, str(out)), nprocs=2, start_method="spawn")
    return torch.load(out)


@pytest.mark.parametrize("lightly", [False, True], ids=["global", "lightly"])
def test_barlow_twins_is_the_same_on_two_processes_as_on_one(tmp_path: Path, lightly: bool) -> None:
    one_loss, one_grad = _loss_and_grad(GlobalBarlowTwinsLoss(), slice(None))
    reference_loss, _ = _loss_and_grad(BarlowTwinsLoss(), slice(None))
    assert one_loss == pytest.approx(reference_loss, rel=1e-5)  # lightly's loss on one process
    two = _two_processes(tmp_path, lightly)
    same = two["loss"] == pytest.approx(one_loss, rel=1e-5) and torch.allclose(two["grad"], one_grad, atol=1e-5)
    assert same != lightly  # lightly standardises each half with its own statistics
