"""The shard layout every domain's preprocess writes and the training stages read: three Arrow
datasets (`datasets`' save_to_disk) under the shards folder.

`pretrain_train` and `pretrain_val` hold the unlabeled rows of those splits (the test split is never
pretrained on), `labeled` one row per labeled sample with its `label`, `split` and `group`. Each
domain chooses its columns; beside the three a domain may write what its encoders need (a
tokenizer, normalisation statistics).

`ShardWriter` takes the rows as preprocess makes them and writes them in batches (datasets'
`ArrowWriter`) to a scratch file a part, so a corpus of a million volumes or slides is never held
in memory as tiles or cubes; on `close` each part is saved from its file, memory-mapped, as
`save_to_disk` saves any dataset. `write_shards` is the same for columns already at hand.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is imported by the stages that write or read shards, not by ingest
    from datasets import Features

PRETRAIN_TRAIN, PRETRAIN_VAL, LABELED = "pretrain_train", "pretrain_val", "labeled"
PRETRAIN_PARTS = {"train": PRETRAIN_TRAIN, "val": PRETRAIN_VAL}  # split -> folder
PARTS = (PRETRAIN_TRAIN, PRETRAIN_VAL, LABELED)


class ShardWriter:
    """The three parts of `out_dir` written as their rows come (a context manager; `close` returns
    the rows of each part).

    `pretrain` names the columns of both pretraining parts in order, `labeled` those of the labeled
    part; each gives them with their types (a `Features`), or `features` types them by name, or
    datasets infers them from the first batch. Rows wait in memory until a part holds `FLUSH_BYTES`
    of them (or `FLUSH_ROWS`), then go to the part's scratch file
    (`out_dir/.parts`, removed on close or on an error). A part's dataset is saved from that file
    memory-mapped; its fingerprint (datasets' cache key, in state.json) is a sha256 of the rows as
    they were given, so the same rows give the same bytes whatever the batches they were written in."""

    FLUSH_BYTES = 32 * 2 ** 20
    FLUSH_ROWS = 10_000

    def __init__(self, out_dir: Path, pretrain: Sequence[str] | Features, labeled: Sequence[str] | Features,
                 features: Mapping[str, Any] | Features | None = None) -> None:
        self.out_dir, self.scratch = out_dir, out_dir / ".parts"
        columns = {PRETRAIN_TRAIN: pretrain, PRETRAIN_VAL: pretrain, LABELED: labeled}
        self.columns = {part: tuple(columns[part]) for part in PARTS}
        self.features = {part: _features_of(columns[part], features) for part in PARTS}
        self.buffered: dict[str, dict[str, list]] = {part: self._empty(part) for part in PARTS}
        self.buffered_bytes = dict.fromkeys(PARTS, 0)
        self.writers: dict[str, Any] = {}
        self.rows = dict.fromkeys(PARTS, 0)
        self.digests = {part: hashlib.sha256() for part in PARTS}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is not None:
            for writer in self.writers.values():
                writer.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _empty(self, part: str) -> dict[str, list]:
        return {column: [] for column in self.columns[part]}

    def add(self, part: str, row: Mapping[str, Any]) -> None:
        """One row of `part` (a value for each of its columns)."""
        buffered, digest = self.buffered[part], self.digests[part]
        size = 0
        for column in self.columns[part]:
            value = row[column]
            buffered[column].append(value)
            size += _size_of(value)
            _feed(digest, value)
        self.rows[part] += 1
        self.buffered_bytes[part] += size
        if self.buffered_bytes[part] >= self.FLUSH_BYTES or len(buffered[self.columns[part][0]]) >= self.FLUSH_ROWS:
            self._flush(part)

    def add_columns(self, part: str, columns: Mapping[str, Any]) -> None:
        """Rows of `part` given as columns (lists, or 2-D numpy arrays: a row each), written at once."""
        self._flush(part)
        for name in self.columns[part]:
            _feed(self.digests[part], columns[name])
        arrays = {name: _arrow_rows(columns[name]) for name in self.columns[part]}
        count = len(next(iter(arrays.values()))) if arrays else 0
        if count:
            self._writer(part).write_batch(arrays)
            self.rows[part] += count

    def _flush(self, part: str) -> None:
        buffered = self.buffered[part]
        if buffered and buffered[self.columns[part][0]]:
            self._writer(part).write_batch(buffered)
        self.buffered[part], self.buffered_bytes[part] = self._empty(part), 0

    def _writer(self, part: str) -> Any:
        if part not in self.writers:
            from datasets.arrow_writer import ArrowWriter

            self.scratch.mkdir(parents=True, exist_ok=True)
            self.writers[part] = ArrowWriter(features=self.features[part], path=str(self.scratch / f"{part}.arrow"))
        return self.writers[part]

    def close(self) -> dict[str, int]:
        """Every part saved as `out_dir/<part>`; the rows of each. A part of zero rows is written
        without a table file (datasets writes none), which `Domain.pretrain_dataset` reads as no rows."""
        from datasets import Dataset, DatasetInfo, Features
        from datasets.table import MemoryMappedTable

        for part in PARTS:
            self._flush(part)
            if part not in self.writers:
                empty = Dataset.from_dict(self._empty(part), features=self.features[part])
                empty.save_to_disk(str(self.out_dir / part))
                continue
            writer = self.writers.pop(part)
            writer.finalize()
            path = self.scratch / f"{part}.arrow"
            table = MemoryMappedTable.from_file(str(path))  # its schema carries the features it was written with
            dataset = Dataset(table, info=DatasetInfo(features=Features.from_arrow_schema(table.schema)),
                              fingerprint=self.digests[part].hexdigest()[:16])
            dataset.save_to_disk(str(self.out_dir / part))
            del dataset, table
            path.unlink()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return dict(self.rows)


def write_shards(out_dir: Path, *, pretrain_train: Mapping[str, Sequence[Any]],
                 pretrain_val: Mapping[str, Sequence[Any]], labeled: Mapping[str, Sequence[Any]],
                 features: Mapping[str, Any] | Features | None = None) -> dict[str, int]:
    """Save each part's columns as the Arrow dataset `out_dir/<part>` (`ShardWriter`); return the
    rows of each part. A column given as a 2-D numpy array (legal's token blocks) becomes an Arrow
    list column straight from its buffer, without a Python list of ints in between; for int32
    blocks the table is the one the lists would give. The two pretraining parts have the same columns."""
    given = {PRETRAIN_TRAIN: pretrain_train, PRETRAIN_VAL: pretrain_val, LABELED: labeled}
    with ShardWriter(out_dir, list(pretrain_train), list(labeled), features) as writer:
        for part, columns in given.items():
            writer.add_columns(part, columns)
        return writer.close()


def _features_of(columns: Any, features: Mapping[str, Any] | None) -> Features | None:
    """A part's column types: its own when `columns` carries them, else those `features` gives its names."""
    from datasets import Features

    if isinstance(columns, Features):
        return columns
    return None if features is None else Features({column: features[column] for column in columns})


def _feed(digest: Any, value: Any) -> None:
    """`value` into `digest`, length-prefixed (bytes as they are, a numpy array as its dtype, shape and
    buffer, anything else as JSON)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        head = json.dumps([value.dtype.str, value.shape]).encode()
        digest.update(len(head).to_bytes(8, "little") + head)
        value = memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    elif not isinstance(value, bytes):
        value = json.dumps(value, sort_keys=True, default=str).encode()
    digest.update(len(value).to_bytes(8, "little"))
    digest.update(value)


def _size_of(value: Any) -> int:
    """About the bytes a buffered value holds (its payload for bytes and strings, a list's items)."""
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(map(_size_of, value))
    return 8


def _arrow_rows(values: Any) -> Any:
    """A 2-D numpy array as an Arrow list array of its rows (of its own dtype); anything else as given."""
    import numpy as np

    if not isinstance(values, np.ndarray):
        return values
    if values.ndim != 2 or not len(values):
        return values.tolist()
    import pyarrow as pa

    width = values.shape[1]
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1)))
