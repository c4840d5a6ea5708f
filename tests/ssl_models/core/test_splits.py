from __future__ import annotations

from collections import Counter

from ssl_models.core.splits import assign_split, select_label_subset


def test_split_depends_only_on_the_unit_and_matches_fractions() -> None:
    units = [f"file-{i}" for i in range(4000)]
    splits = [assign_split(u, 0.1, 0.2, "s") for u in units]
    assert splits == [assign_split(u, 0.1, 0.2, "s") for u in units]  # deterministic
    counts = Counter(splits)
    assert abs(counts["test"] / 4000 - 0.2) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.03


def test_label_subset_is_stratified_group_whole_and_seeded() -> None:
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    groups = [f"patient-{i // 3}" for i in range(100)]  # three samples per group
    subset = select_label_subset(labels, groups, 0.1, seed=0)
    chosen_labels = Counter(labels[i] for i in subset)
    assert set(chosen_labels) == {"a", "b", "c"}  # every class present, even the rare one
    assert 8 <= len(subset) <= 16
    chosen_groups = {groups[i] for i in subset}
    assert all(i in subset for i, g in enumerate(groups) if g in chosen_groups)  # whole groups
    assert subset == select_label_subset(labels, groups, 0.1, seed=0)
    assert subset != select_label_subset(labels, groups, 0.1, seed=1)
    assert select_label_subset(labels, groups, 1.0, seed=3) == list(range(100))
