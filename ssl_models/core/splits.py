"""Deterministic splits by hash (group-aware), and stratified label subsets drawn by example."""

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


def select_label_subset(labels: list[str], fraction: float, seed: int) -> list[int]:
    """Indices of about `fraction` of the rows, drawn example by example within each label
    (stratified: round(fraction x the label's count), at least one per label), sorted.

    Examples, not whole groups, are the unit, so 1% and 10% differ even when a few groups hold
    every row; the test split is separated by group upstream (`assign_split`), so no group
    straddles train and test whatever is drawn here. Each label's order is a permutation drawn
    from `seed` that does not depend on `fraction`: one seed's smaller subsets are inside its
    larger ones, and the same (fraction, seed) gives the same subset for every initialisation,
    so runs are paired."""
    if fraction >= 1.0:
        return list(range(len(labels)))
    members: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        members[label].append(index)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(members):
        order = rng.permutation(len(members[label]))
        take = max(1, round(fraction * len(members[label])))
        chosen.extend(members[label][position] for position in order[:take])
    return sorted(chosen)
