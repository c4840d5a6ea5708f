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


def _peak_of_writing(folder: Path, rows: int) -> int:
    """Peak Python memory (tracemalloc) of writing `rows` rows of 16 KiB to every part."""
    import tracemalloc

    import numpy as np

    from ssl_models.core.shards import PARTS, ShardWriter

    blob = np.random.default_rng(0).bytes(16 * 1024)
    tracemalloc.start()
    try:
        with ShardWriter(folder, ("id", "pixels"), ("id", "pixels")) as writer:
            for number in range(rows):
                for part in PARTS:
                    writer.add(part, {"id": str(number), "pixels": blob + number.to_bytes(4, "little")})
            assert writer.close() == dict.fromkeys(PARTS, rows)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rows_are_written_as_they_come_not_held(tmp_path: Path, monkeypatch) -> None:
    """A preprocess of a million volumes or slides must not hold their cubes or tiles: `ShardWriter`
    writes a part's rows once it holds FLUSH_BYTES of them (made 256 KiB here). Ten times the
    rows (3 x 30 MiB more), about the same peak; every row is read back in order."""
    from datasets import load_from_disk

    from ssl_models.core.shards import ShardWriter

    monkeypatch.setattr(ShardWriter, "FLUSH_BYTES", 256 * 1024)
    _peak_of_writing(tmp_path / "warm", 20)  # datasets' and pyarrow's first use is not the rows
    small, large = _peak_of_writing(tmp_path / "small", 200), _peak_of_writing(tmp_path / "large", 2000)
    assert large - small < 4 * 2 ** 20, f"{small} -> {large} bytes at peak for 10x the rows"
    stored = load_from_disk(str(tmp_path / "large" / PRETRAIN_TRAIN))
    assert stored["id"] == [str(n) for n in range(2000)]
    assert stored[1999]["pixels"][-4:] == (1999).to_bytes(4, "little")
    assert not (tmp_path / "large" / ".parts").exists()


def test_the_same_rows_give_the_same_bytes_whatever_their_batches(tmp_path: Path, monkeypatch) -> None:
    """Byte-identical shards for 1 worker, N workers and Dask rest on this: the files (state.json's
    fingerprint included) depend on the rows, not on when the writer flushed them."""
    from ssl_models.core.shards import ShardWriter

    made = []
    for flush in (10 ** 9, 40_000, 1):
        monkeypatch.setattr(ShardWriter, "FLUSH_BYTES", flush)
        _peak_of_writing(tmp_path / str(flush), 30)
        made.append({p.relative_to(tmp_path / str(flush)): p.read_bytes()
                     for p in sorted((tmp_path / str(flush)).rglob("*")) if p.is_file()})
    assert made[0] == made[1] == made[2] and len(made[0]) == 9
