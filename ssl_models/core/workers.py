"""How a domain's per-source work reaches the stage's engine (local processes, a Dask cluster,
chunks kept across a kill: tasks/workers.py) without the domain knowing which.

A domain's preprocess calls `run_chunks(function, chunks, identities)`: `function(chunk)` (a
module-level function, so any process can run it) for every chunk, results in the chunks' order.
The stage sets the engine for the block it runs the domain in (`running_on`); outside a stage
(a test, a notebook) the chunks run here, one after the other.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


class Engine(Protocol):
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


def run_chunks(function: Callable[[Any], Any], chunks: Sequence[Any], identities: Sequence[str]) -> Iterator[Any]:
    """`function(chunk)` of every chunk in order, on the stage's engine (here when none is set).
    `identities[i]` names chunk i's inputs (paths, sizes, times: see `tasks.workers`)."""
    engine = _ENGINE.get()
    if engine is None:
        return (function(chunk) for chunk in chunks)
    return engine.results(function, chunks, identities)


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
