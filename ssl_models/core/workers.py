"""How a domain's per-source work reaches the stage's engine (local processes, a Dask cluster,
chunks kept across a kill: tasks/workers.py) without the domain knowing which.

A domain's preprocess calls `run_items(function, shared, items, identities)`: `function((shared,
chunk))` (a module-level function, so any process can run it) for every chunk of the items, one
result per item in the items' order.
The stage sets the engine for the block it runs the domain in (`running_on`); outside a stage
(a test, a notebook) the chunks run here, one after the other.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Engine(Protocol):
    def chunk_length(self, items: int, whole: bool = True) -> int: ...

    def results_of(self, function: Callable[[Any], Any], chunks: Iterable[tuple[Any, str]],
                   fresh: Callable[[Any, Any], bool] | None = None) -> Iterator[Any]: ...

    def part(self, name: str) -> Engine: ...


_ENGINE: contextvars.ContextVar[Engine | None] = contextvars.ContextVar("ssl_pipeline_engine", default=None)


@contextlib.contextmanager
def running_on(engine: Engine) -> Iterator[None]:
    token = _ENGINE.set(engine)
    try:
        yield
    finally:
        _ENGINE.reset(token)


LOOKAHEAD = 16_384  # items read ahead to size the chunks: the whole stream when it is shorter


def run_items(function: Callable[[Any], list[Any]], shared: Any, items: Iterable[Any],
              identities: Iterable[Any] | Callable[[Any], Any],
              fresh: Callable[[list[Any], list[Any]], bool] | None = None, part: str | None = None) -> Iterator[Any]:
    """One result per item of `items`, in order: `function((shared, chunk))` returns the results of
    a chunk of items, run on the stage's engine in chunks of its size (here, in LOOKAHEAD items at a
    time, when no engine is set). `identities[i]` (or `identities(item)`) names item i's inputs (key, content hash,
    `file_stamp`s): a chunk whose inputs changed is never taken from an earlier run. `items` may be a
    stream (a corpus listed as it is walked): the chunks are sized from the first LOOKAHEAD items
    (the whole stream when it is shorter) and made as the engine takes them, so no list of the
    items is ever held. `fresh(items, results)`, when given, is asked of a chunk an earlier run
    finished before its results are taken: False (an input changed since) has the chunk done again.
    It lets an identity name the inputs without a `stat` of each (ingest: their keys), the results
    carrying what `fresh` compares. `part` names work of its own within the stage (3D ingest reads
    the DICOM headers on the engine before it reads the series): its chunks are kept apart from
    the stage's own."""
    engine = _ENGINE.get()
    if engine is not None and part:
        engine = engine.part(part)
    pairs = (((item, identities(item)) for item in items) if callable(identities)
             else zip(items, identities))
    head = list(itertools.islice(pairs, LOOKAHEAD))
    size = engine.chunk_length(len(head), len(head) < LOOKAHEAD) if engine is not None else max(1, len(head))
    stream = itertools.chain(head, pairs)
    del head

    def chunks() -> Iterator[tuple[Any, str]]:
        while batch := list(itertools.islice(stream, size)):
            yield (shared, [item for item, _ in batch]), digest_of_inputs([identity for _, identity in batch])

    if engine is None:
        for job, _ in chunks():
            yield from function(job)
        return
    kept_fresh = None if fresh is None else (lambda job, results: fresh(job[1], results))
    for done in engine.results_of(function, chunks(), kept_fresh):
        yield from done


def file_stamp(path: Any) -> tuple[int, int]:
    """A file's size and modification time (ns): what a chunk's identity records of each input."""
    import os

    try:
        status = os.stat(path)
    except OSError:
        return (-1, -1)
    return (status.st_size, status.st_mtime_ns)


def digest_of_inputs(parts: Any) -> str:
    """A chunk's identity from JSON-ready `parts` (keys, content hashes, `file_stamp`s)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
