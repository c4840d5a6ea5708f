"""The shard layout every domain's preprocess writes and the training stages read: three Arrow
datasets (`datasets`' save_to_disk) under the shards folder.

`pretrain_train` and `pretrain_val` hold the unlabeled rows of those splits (the test split is never
pretrained on), `labeled` one row per labeled sample with its `label`, `split` and `group`. Each
domain chooses its columns; beside the three a domain may write what its encoders need (a
tokenizer, normalisation statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is imported by the stages that write or read shards, not by ingest
    from datasets import Features

PRETRAIN_TRAIN, PRETRAIN_VAL, LABELED = "pretrain_train", "pretrain_val", "labeled"
PRETRAIN_PARTS = {"train": PRETRAIN_TRAIN, "val": PRETRAIN_VAL}  # split -> folder


def write_shards(out_dir: Path, *, pretrain_train: Mapping[str, Sequence[Any]],
                 pretrain_val: Mapping[str, Sequence[Any]], labeled: Mapping[str, Sequence[Any]],
                 features: Mapping[str, Any] | Features | None = None) -> dict[str, int]:
    """Save each part's columns as the Arrow dataset `out_dir/<part>` (one table file under
    datasets' default shard size); return the rows of each part.

    `features` types the columns by name (each part takes those of its own columns, in its own
    order); without, datasets infers the types from the values. A column given as a 2-D numpy
    array (legal's token blocks) becomes an Arrow list column straight from its buffer, without
    a Python list of ints in between (about 1.7 KB a block of 128 tokens, and as much again when
    datasets converts it); for int32 blocks the table is the one the lists would give (datasets
    stores an `input_ids` list column as int32 either way). A part of zero rows is
    written without a table file (datasets writes none), which `Domain.pretrain_dataset` reads as no rows."""
    from datasets import Dataset, Features

    rows: dict[str, int] = {}
    for part, columns in ((PRETRAIN_TRAIN, pretrain_train), (PRETRAIN_VAL, pretrain_val), (LABELED, labeled)):
        typed = None if features is None else Features({column: features[column] for column in columns})
        dataset = Dataset.from_dict({name: _arrow_rows(values) for name, values in columns.items()}, features=typed)
        dataset.save_to_disk(str(out_dir / part))
        rows[part] = dataset.num_rows
    return rows


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
