"""RankMe: the effective rank of a set of embeddings, a label-free quality signal.

Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023. A collapsed encoder scores near 1; higher is
usually better for downstream probes.
"""

from __future__ import annotations

import torch


def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy) of the normalised singular values of `embeddings` [n, dim]."""
    singular_values = torch.linalg.svdvals(embeddings.double())
    p = singular_values / (singular_values.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
