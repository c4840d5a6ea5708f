"""Where training runs: a CUDA GPU when there is one (bf16 autocast), else the CPU.

`SSL_PIPELINE_DEVICE=cpu` forces the CPU. Results on a GPU are close to, not bit-identical
with, CPU results, and a resumed GPU run is not guaranteed to match an uninterrupted one bit
for bit (cuDNN kernels are not all deterministic); on the CPU both hold.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch


def training_device() -> torch.device:
    wanted = os.environ.get("SSL_PIPELINE_DEVICE", "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if wanted == "auto" else torch.device(wanted)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what fp32 parts remain use tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return device


def move(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on `device`; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # dicts, and transformers' BatchEncoding (a UserDict)
        return {key: move(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(value, device) for value in batch)
    return batch


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 mixed precision (no loss scaling needed) with `precision: bf16`, and by default on a
    GPU; full precision with `fp32`, and by default on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def on_cpu(module: torch.nn.Module, device: torch.device):
    """Run `module` on the CPU for a moment (domain `embed` methods build CPU tensors), then
    put it back; parameters keep their identity, so the optimizer still holds them."""
    if device.type == "cpu":
        yield module
        return
    module.to("cpu")
    try:
        yield module
    finally:
        module.to(device)


def set_cpu_threads(threads: int | None) -> None:
    """The one CPU-thread setting (`domains.<d>.cpu_threads`), applied by the stages that compute.

    Small models on a shared CPU often run several times faster on one thread: threads of tiny
    matrix products mostly wait for each other. None keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel where torch has one (CUDA, CPU): one pass over all parameters instead
    of a loop of small ops per tensor (a 1.5M-parameter BERT's step: 75 ms looped, 6 ms fused, on
    this 2-core CPU)."""
    return device.type in ("cuda", "cpu")
