"""`write_shards`: a 2-D numpy column (legal's int32 token blocks) is written as the table its rows
as Python lists give, without the lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ssl_models.core.shards import PRETRAIN_TRAIN, write_shards


def test_a_numpy_block_column_writes_the_table_of_its_rows_as_lists(tmp_path: Path) -> None:
    from datasets import load_from_disk

    blocks = np.random.default_rng(0).integers(0, 8000, (300, 16)).astype(np.int32)
    for name, column in (("lists", blocks.tolist()), ("array", blocks)):
        rows = write_shards(tmp_path / name, pretrain_train={"input_ids": column}, pretrain_val={"input_ids": blocks[:0]},
                            labeled={"text": ["a", "b"], "label": ["x", "y"]})
        assert rows == {"pretrain_train": 300, "pretrain_val": 0, "labeled": 2}
    for part in ("pretrain_train", "labeled"):
        for file in ("data-00000-of-00001.arrow", "dataset_info.json"):
            assert (tmp_path / "array" / part / file).read_bytes() == (tmp_path / "lists" / part / file).read_bytes()
    assert load_from_disk(str(tmp_path / "array" / PRETRAIN_TRAIN))["input_ids"] == blocks.tolist()


def test_a_numpy_column_keeps_its_own_dtype(tmp_path: Path) -> None:
    from datasets import load_from_disk

    values = np.arange(40, dtype=np.int64).reshape(10, 4) * 2 ** 33  # beyond int32
    write_shards(tmp_path, pretrain_train={"values": values}, pretrain_val={"values": values[:0]},
                 labeled={"label": []})
    stored = load_from_disk(str(tmp_path / PRETRAIN_TRAIN))
    assert stored.features["values"].feature.dtype == "int64" and stored["values"] == values.tolist()
