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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


class Engine(Protocol):
    def chunk_length(self, items: int) -> int: ...

    def results(self, function: Callable[[Any], Any], chunks: Sequence[Any],
                identities: Sequence[str]) -> Iterator[Any]: ...


_ENGINE: contextvars.ContextVar[Engine | None] = contextvars.ContextVar("ssl_pipeline_engine", default=None)


@contextlib.contextmanager
def running_on(engine: Engine) -> Iterator[None]:
    token = _ENGINE.set(engine)
    try:
        yield
    finally:
        _ENGINE.reset(token)


def run_items(function: Callable[[Any], list[Any]], shared: Any, items: Sequence[Any],
              identities: Sequence[Any]) -> Iterator[Any]:
    """One result per item of `items`, in order: `function((shared, chunk))` returns the results of
    a chunk of items, run on the stage's engine in chunks of its size (all at once here when no
    engine is set). `identities[i]` names item i's inputs (key, content hash, `file_stamp`s): a
    chunk whose inputs changed is never taken from an earlier run."""
    engine = _ENGINE.get()
    size = engine.chunk_length(len(items)) if engine is not None else max(1, len(items))
    starts = range(0, len(items), size)
    jobs = [(shared, items[start:start + size]) for start in starts]
    names = [digest_of_inputs(list(identities[start:start + size])) for start in starts]
    results = engine.results(function, jobs, names) if engine is not None else map(function, jobs)
    for done in results:
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
