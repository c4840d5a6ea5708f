from __future__ import annotations

from collections import Counter

from ssl_models.core.splits import assign_split, select_label_subset


def test_split_depends_only_on_the_unit_and_matches_fractions() -> None:
    units = [f"file-{i}" for i in range(4000)]
    splits = [assign_split(u, 0.1, 0.2, "s") for u in units]
    assert splits == [assign_split(u, 0.1, 0.2, "s") for u in units]  # deterministic
    counts = Counter(splits)
    assert abs(counts["test"] / 4000 - 0.2) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.03


def test_label_subset_is_drawn_by_example_stratified_and_seeded() -> None:
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    groups = [f"site-{i % 3}" for i in range(1000)]  # three groups hold every row
    one, ten = (select_label_subset(labels, fraction, seed=0) for fraction in (0.01, 0.1))
    for subset, fraction in ((one, 0.01), (ten, 0.1)):
        counts = Counter(labels[i] for i in subset)
        assert counts == {label: max(1, round(fraction * n)) for label, n in Counter(labels).items()}
    assert (len(one), len(ten)) == (10, 100)  # 1% and 10% differ although there are only three groups
    assert set(one) < set(ten)  # one seed's smaller subset lies inside its larger one
    assert len({groups[i] for i in one}) > 1  # examples, not a whole group, are drawn
    assert one == select_label_subset(labels, 0.01, seed=0) and one == sorted(one)
    assert ten != select_label_subset(labels, 0.1, seed=1)
    assert select_label_subset(labels, 1.0, seed=3) == list(range(1000))


def test_every_label_gets_at_least_one_example() -> None:
    labels = ["common"] * 500 + ["rare"] * 2
    subset = select_label_subset(labels, 0.01, seed=4)
    assert Counter(labels[i] for i in subset) == {"common": 5, "rare": 1}
