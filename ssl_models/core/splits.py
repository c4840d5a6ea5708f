"""Deterministic splits by hash, and label subsets that are stratified and group-aware."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np


def assign_split(unit: str, val: float, test: float, salt: str) -> str:
    """train / val / test from a hash of the unit (a group id or a content hash).

    Depends on nothing but the unit, so adding files never moves old ones between splits."""
    position = int(hashlib.sha256(f"{salt}:{unit}".encode()).hexdigest()[:12], 16) / 16**12
    if position < test:
        return "test"
    if position < test + val:
        return "val"
    return "train"


def select_label_subset(labels: list[str], groups: list[str], fraction: float, seed: int) -> list[int]:
    """Indices of about `fraction` of the rows, whole groups at a time, stratified by label.

    Each label's groups (a group counts for its most common label) are shuffled with `seed`
    and taken until the label has its share, at least one group per label. The same
    (fraction, seed) gives the same subset for every initialisation, so runs are paired."""
    if fraction >= 1.0:
        return list(range(len(labels)))
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    groups_of_label: dict[str, list[str]] = defaultdict(list)
    for group, indices in sorted(members.items()):
        values, counts = np.unique([labels[i] for i in indices], return_counts=True)
        groups_of_label[str(values[np.argmax(counts)])].append(group)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(groups_of_label):
        candidates = groups_of_label[label]
        order = rng.permutation(len(candidates))
        target = max(1, round(fraction * sum(len(members[g]) for g in candidates)))
        taken = 0
        for position in order:
            if taken >= target:
                break
            group_indices = members[candidates[position]]
            chosen.extend(group_indices)
            taken += len(group_indices)
    return sorted(chosen)
