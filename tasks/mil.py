"""Attention-based multiple-instance learning (the `abmil` protocol): a small head trained on the
frozen instance embeddings of each labeled bag (a slide's tiles), beside mean pooling.

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, with
their gated attention: each instance h_k gets a weight a_k = softmax_k(w^T (tanh(V h_k) *
sigmoid(U h_k))), the bag is sum_k a_k h_k, and a linear classifier reads it. Slide-level
evaluation of pathology encoders uses it (eva, kaiko's "Domain-specific optimization and diverse
evaluation of self-supervised models for histopathology"): a label that one region of the slide
decides is diluted by the mean of all its tiles, not by attention.

Written here rather than taken from a library: MONAI's `MILModel` has the ungated attention
only, a fixed 2048-wide layer and no mask for bags of different sizes; the head is ~20 lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ssl_models.core.config import FinetuneConfig, epoch_steps
from ssl_models.core.device import autocast, fused_adamw, move
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from tasks.probes import train_class_weighted

BATCH_ROWS = 64  # labeled rows (bags) per forward pass of the frozen encoder, as `embed_rows`


class GatedAttentionMIL(nn.Module):
    """Instances [bags, n, dim] (padding masked out) -> class logits [bags, classes].

    >>> head = GatedAttentionMIL(dim=32, hidden=16, n_classes=2)
    >>> logits, attention = head(torch.randn(3, 5, 32), torch.ones(3, 5, dtype=torch.bool))
    """

    def __init__(self, dim: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.attention_v = nn.Linear(hidden, hidden)  # tanh branch
        self.attention_u = nn.Linear(hidden, hidden)  # sigmoid gate
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, instances: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and each instance's attention weight [bags, n] (0 on padding)."""
        hidden = self.embed(instances)
        score = self.attention_w(torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden)))
        attention = torch.softmax(score.squeeze(-1).masked_fill(~mask, float("-inf")), dim=1)
        return self.classifier(torch.einsum("bn,bnh->bh", attention, hidden)), attention


@torch.no_grad()
def embed_bags(encoder: Encoder, rows: list[dict], batch_size: int = BATCH_ROWS,
               precision: str = "auto") -> tuple[np.ndarray, list[np.ndarray]]:
    """One pass of the frozen encoder over `rows`: the pooled features, exactly as `embed_rows`
    gives them (the same batches, the encoder's own pooling), and each row's instance features
    [instances, dim], all float32 on the CPU."""
    if not hasattr(encoder, "instance_features") or not hasattr(encoder, "pool_instances"):
        raise PipelineError(f"the abmil protocol needs an encoder that gives each instance of a bag its own "
                            f"features; {type(encoder).__name__} gives one per row: remove abmil from "
                            "finetune.protocols")
    encoder.eval()
    device = next(encoder.parameters()).device
    pooled, instances = [], []
    for start in range(0, len(rows), batch_size):
        batch = move(encoder.collate(rows[start:start + batch_size]), device)
        with autocast(device, precision):
            features = encoder.instance_features(batch)
            pooled.append(encoder.pool_instances(features, batch["bag"]).float().cpu())
        features, bags = features.float().cpu(), batch["bag"].cpu()
        counts = torch.bincount(bags, minlength=len(rows[start:start + batch_size])).tolist()
        order = torch.argsort(bags, stable=True)  # by row, whatever order an encoder's collate gives
        instances += [part.numpy() for part in torch.split(features[order], counts)]
    return torch.cat(pooled).numpy(), instances


def pad_bags(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of different sizes -> zero-padded [bags, longest, dim] and the mask of real instances."""
    longest = max(len(bag) for bag in bags)
    padded = torch.zeros(len(bags), longest, bags[0].shape[1])
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        padded[i, :len(bag)] = torch.from_numpy(bag)
        mask[i, :len(bag)] = True
    return padded, mask


@contextlib.contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, torch on one thread for the head's small matrices (a bag batch is 16 x 16 x dim):
    measured 0.85 s against 10.5 s for 200 steps with 2 threads on 2 busy cores, as the probes'
    `one_blas_thread`; and the same floats whatever thread count a process of a parallel run has."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def abmil_steps(cfg: FinetuneConfig, n_train: int) -> int:
    """`cfg.abmil_epochs` passes over the subset's bags in batches of `cfg.batch_size`, capped at
    `cfg.max_steps`: fine-tuning's rule, with the head's own number of passes."""
    return epoch_steps(cfg.abmil_epochs, n_train, cfg.batch_size, cfg.max_steps)


def abmil_probe(train_bags: list[np.ndarray], train_y: list[str], test_bags: list[np.ndarray],
                classes: list[str], cfg: FinetuneConfig, seed: int,
                device: torch.device | str = "cpu") -> tuple[list[str], np.ndarray]:
    """Train a gated-attention MIL head on the frozen instance features of the training bags
    (AdamW at `head_learning_rate`, cosine schedule with 10% warm-up, the loss weighted per
    class by `cfg.class_weight` as every trained protocol), for `abmil_steps` steps; test
    predictions and class probabilities (columns in `classes` order). Drawn from `seed` alone."""
    device = torch.device(device)
    with one_torch_thread(device):
        return _train_and_predict(train_bags, train_y, test_bags, classes, cfg, seed, device)


def _train_and_predict(train_bags: list[np.ndarray], train_y: list[str], test_bags: list[np.ndarray],
                       classes: list[str], cfg: FinetuneConfig, seed: int,
                       device: torch.device) -> tuple[list[str], np.ndarray]:
    with torch.random.fork_rng(devices=[]):  # the head from `seed`, not from what ran before in the process
        torch.manual_seed(seed)
        head = GatedAttentionMIL(train_bags[0].shape[1], cfg.abmil_hidden, len(classes)).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.head_learning_rate, fused=fused_adamw(device))

    def logits_of(batch_ids: list[int]) -> torch.Tensor:
        instances, mask = pad_bags([train_bags[i] for i in batch_ids])
        return head(instances.to(device), mask.to(device))[0]

    head.train()
    train_class_weighted(optimizer, abmil_steps(cfg, len(train_bags)), train_y, classes, cfg, seed, device, logits_of)
    head.eval()
    probabilities = []
    with torch.no_grad():
        for start in range(0, len(test_bags), BATCH_ROWS):
            instances, mask = pad_bags(test_bags[start:start + BATCH_ROWS])
            logits, _ = head(instances.to(device), mask.to(device))
            probabilities.append(torch.softmax(logits, dim=1).cpu())
    probability = torch.cat(probabilities).numpy()
    return [classes[i] for i in probability.argmax(axis=1)], probability
