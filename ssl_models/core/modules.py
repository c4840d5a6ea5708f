"""The model interfaces of the domain contract: an encoder, a pretraining method, and the
method's data side (what happens to raw rows before the forward pass)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


def sample_seed(seed: int, step: int, index: int) -> int:
    """The seed of sample `index` of batch `step`: a function of the three numbers alone, so a
    batch draws the same views and masks whichever process (rank, loader worker) builds it."""
    digest = hashlib.sha256(f"sample:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: fits torch's and numpy's seeds


def sample_seeds(seed: int, step: int, positions: Sequence[int]) -> list[int]:
    """`sample_seed` for each position of the step's (global) batch."""
    return [sample_seed(seed, step, index) for index in positions]


def generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with `seed` (draws stay on the CPU whatever the device)."""
    return torch.Generator().manual_seed(seed)


class DataSide(ABC):
    """Raw pretraining rows -> a batch of tensors: tokenising, masking, views, augmentations.

    Picklable (no modules, no open files), so DataLoader workers can run it. Every random
    draw comes from the sample's own seed (`sample_seed(seed, step, index)`), never from a
    global generator: the same rows and seeds give the same batch in any process."""

    @abstractmethod
    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch of `rows`, sample i drawing its randomness from `seeds[i]`."""


class Encoder(nn.Module, ABC):
    """Maps a batch of samples to one feature vector each: [batch, dim]."""

    dim: int

    @abstractmethod
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Turn rows of the labeled shard into model inputs (deterministic)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def save(self, out_dir: Path) -> None:
        """Write the encoder so that the domain's `load_encoder` reads it back without this code's state."""

    def repeated_blocks(self) -> list[nn.Module]:
        """The backbone's repeated blocks (transformer layers, residual blocks): what activation
        checkpointing recomputes and FSDP2 shards one by one. By default `repeated_blocks(self)`;
        an encoder whose blocks that rule misses overrides this."""
        return repeated_blocks(self)


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The members of every outermost `ModuleList` / `Sequential` under `module` whose members are
    all of one class with submodules of its own: BERT's `encoder.layer`, `nn.TransformerEncoder`'s
    `layers`, timm's ViT `blocks` and ResNet `layer1..4`, MONAI's ViT `blocks`, wav2vec2's
    `encoder.layers`. Containers of plain layers (an MLP's Linear / GELU) do not qualify."""
    found: list[nn.Module] = []
    for child in module.children():
        members = list(child.children())
        if (isinstance(child, (nn.ModuleList, nn.Sequential)) and members
                and len({type(m) for m in members}) == 1
                and not isinstance(members[0], (nn.ModuleList, nn.Sequential))
                and any(True for _ in members[0].children())):
            found.extend(members)
        else:
            found.extend(repeated_blocks(child))
    return found


class PretrainMethod(nn.Module, ABC):
    """A self-supervised objective around an encoder: `forward(batch) -> loss`.

    One constructor shape for every method: `Method(encoder, options)`, where `options` is the
    method's options dataclass (registered with it, parsed from `pretrain.options`). The method
    owns its encoder: `encoder()` returns it, sharing its weights, and the pretrain stage saves it."""

    # How `pretrain.checkpoint_choice: auto` picks the encoder among the logged checkpoints:
    # "rankme" (the highest effective rank) or "last". RankMe is validated on joint-embedding
    # methods only, those that pull two views' pooled embeddings together, whose collapse it
    # sees (Garrido et al., ICML 2023); a method that reconstructs or predicts masked content
    # keeps "last". A joint-embedding method sets "rankme".
    checkpoint_rule: ClassVar[str] = "last"

    def __init__(self, encoder: Encoder, options: Any) -> None:
        super().__init__()
        self.backbone_encoder = encoder
        self.options = options

    def encoder(self) -> Encoder:
        """The encoder being pretrained (the same modules, not a copy)."""
        return self.backbone_encoder

    def prepare(self, rows: Any) -> None:
        """Called once before the first step of a run that does not resume, with the training rows
        (the same on every process): where a method fits something on the data first (HuBERT's
        k-means codebook). What it fits must be module state, so checkpoints carry it. Nothing by default."""

    @abstractmethod
    def data_side(self) -> DataSide:
        """The picklable callable that turns pretraining rows into this method's batches."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        """Pooled encoder features [batch, dim] of clean (un-augmented) pretraining rows,
        for RankMe at each checkpoint."""
