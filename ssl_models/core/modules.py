"""The two model interfaces of the domain contract: an encoder and a pretraining method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Encoder(nn.Module, ABC):
    """Maps a batch of samples to one feature vector each: [batch, dim]."""

    dim: int

    @abstractmethod
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Turn rows of the labeled shard into model inputs."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def save(self, out_dir: Path) -> None:
        """Write the encoder so that it can be loaded again without this code's state."""


class PretrainMethod(nn.Module, ABC):
    """A self-supervised objective on a backbone: `forward(batch) -> loss`."""

    @abstractmethod
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Turn rows of the pretraining shard into a batch (views, masks...)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        """Pooled backbone features [batch, dim] of clean (un-augmented) pretraining rows,
        for RankMe at each checkpoint."""
