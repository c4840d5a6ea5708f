"""A stage's per-file work spread over local processes or a Dask cluster, in chunks a kill does not lose.

`ChunkedWork.results_of(function, pairs)` calls `function(chunk)` for every chunk and yields the
results in the chunks' order, whatever the engine and however many workers ran them, so what the
stage writes from them is byte-identical for 1 worker, N workers and a Dask cluster:

- one worker and no scheduler: in this process, no pool;
- `workers` > 1: a `concurrent.futures.ProcessPoolExecutor` of that many processes (forkserver:
  nothing of this process' threads or locks is inherited);
- a Dask scheduler address (the section's `scheduler`, else Dask's own `DASK_SCHEDULER_ADDRESS`):
  `distributed.Client(address).submit` for every chunk. The workers import this package, so they
  run in an environment with the project installed and see the corpus at the same path (a shared
  file system); README "Corpora of a million files" shows a SLURM cluster (dask-jobqueue) and a
  two-machine setup.

Each chunk's result is written into the stage's work folder the moment it is in
(`<index>-<digest>.chunk`, under a temporary name then renamed: the result as JSON with its
`bytes` values, e.g. tiles, as length-prefixed blobs after it; never a pickle), the digest covering the chunk's identity (what the caller
says names its inputs: paths, sizes, modification times) and the settings that shape the result.
A run killed part-way starts again at the first chunk without a result; a chunk whose inputs or
settings changed has another digest and is done again. A caller whose identities name the inputs
without their state (ingest: the files' keys, no `stat` of each in the stage's process) passes
`fresh`, which checks a chunk read back against what its result recorded of its inputs. Every result, fresh or read back, goes
through the same encoding, so a resumed run writes the same bytes as an uninterrupted one. The
folder is the stage's working state (under `.ssl-pipeline/work/`, never a DVC output), removed
once the stage's output is in place (`finish`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ssl_models.core.errors import PipelineError
from ssl_models.core.processes import available_cores, collect_less, keep_freed_memory
from ssl_models.core.workers import digest_of_inputs

log = logging.getLogger("workers")

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"  # Dask's own variable (dask config `scheduler-address`)


def resolve_workers(setting: int | str | None) -> int:
    """`auto` (or null): the cores this process may run on; else the number given (at least 1)."""
    return available_cores() if setting in (None, "auto") else max(1, int(setting))


def scheduler_address(setting: str | None) -> str | None:
    """The Dask scheduler to run on: the section's `scheduler`, else $DASK_SCHEDULER_ADDRESS, else none."""
    return setting or os.environ.get(SCHEDULER_ENV) or None


READ_AHEAD = 256  # chunks kept by a run before, read back in order, that may wait behind those in flight
AUTO_MIN_ITEMS = 256  # `workers: auto` below this many sources: in the stage's process
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# auto chunks a worker takes where the run knows all its items (at most `max_items` items each; a
# longer stream: 4 a worker of its first LOOKAHEAD items, see `chunk_length`). The work ends when the
# last chunk does, and the other workers wait for it: with 4 a worker, 384 DICOM series on 2 workers
# came in 8 chunks of 48 series and one worker ran 18.1 CPU-s of them against 15.7 for the other.
CHUNKS_PER_WORKER = 16
STREAM_CHUNKS_PER_WORKER = 4  # of the first LOOKAHEAD items of a longer stream, whose rest makes more

WORKER_NICENESS = 10  # a local worker's scheduling priority below the stage's process (nice(1)'s default)


def share_cores(threads: int) -> None:
    """In a worker process, before its libraries start their thread pools: `threads` each (torch,
    numpy's BLAS, OpenMP), so N workers use the machine's cores once, not N times over; and freed
    file-sized blocks kept for the next file (`keep_freed_memory`); the garbage collector run less
    often (`collect_less`), as in the stage's own process. The worker runs niced: the
    stage's own process hands out the chunks and writes their results in order, so the workers
    wait on it; with as many workers as cores, at equal priority it got a third of a core less
    than it needed (legal ingest, 2 workers on 2 cores) while the workers ran ahead."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    keep_freed_memory()
    collect_less()  # as the stage's own process: a few short-lived objects a record


class ChunkedWork:
    """Run one stage's chunks (see the module docstring) with the results kept in `folder`."""

    def __init__(self, folder: Path, settings: Any, *, workers: int | str | None = 1,
                 scheduler: str | None = None, chunk_size: int | str | None = "auto", window: int = 2,
                 label: str = "work", max_items: int = 64) -> None:
        self.label = label
        self.folder, self.settings, self.chunk_size = folder, digest_of_inputs(settings), chunk_size
        self.workers_setting = workers  # as given (auto or a number): a part is run as the stage is
        self.parts: list[ChunkedWork] = []
        self.max_items = max_items
        self.workers, self.scheduler = resolve_workers(workers), scheduler_address(scheduler)
        self.chosen = workers not in (None, "auto")  # a number the user set: always used
        self.items: int | None = None  # what the work is made of, once chunk_length was asked
        self.length = 1  # the items a chunk carries, as chunk_length settled it
        self.window = window  # chunks in flight per worker
        self.resumed = 0  # chunks read back from an earlier run

    def part(self, name: str) -> ChunkedWork:
        """Work of its own within the stage, on the same engine, its chunks in a folder beside the
        stage's (removed with it by `finish`)."""
        work = ChunkedWork(self.folder.with_name(f"{self.folder.name}-{name}"), [self.settings, name],
                           workers=self.workers_setting, scheduler=self.scheduler, chunk_size=self.chunk_size,
                           window=self.window, label=f"{self.label} ({name})", max_items=self.max_items)
        self.parts.append(work)
        return work

    def chunk_length(self, items: int, whole: bool = True) -> int:
        """Items a chunk carries: the section's `chunk_size`, or (auto) enough chunks for every worker
        to take several (load balance, resume granularity), at most `max_items` each. `whole`: `items`
        is all of the work (CHUNKS_PER_WORKER chunks a worker); else the first items of a longer
        stream (STREAM_CHUNKS_PER_WORKER a worker of them: the rest of the stream makes more, so the
        last is a smaller part of the whole; legal ingest of 200,000 texts on 2 workers: 1,024 texts a
        chunk, not 512)."""
        self.items = items
        if self.chunk_size not in (None, "auto"):
            self.length = max(1, int(self.chunk_size))
        else:
            per_worker = CHUNKS_PER_WORKER if whole else STREAM_CHUNKS_PER_WORKER
            slots = per_worker * (max(self.workers, 8) if self.scheduler else self.workers)
            self.length = max(1, min(self.max_items, -(-items // slots)))
        return self.length

    @property
    def engine(self) -> str:
        if self.scheduler:
            return f"Dask scheduler {self.scheduler}"
        return f"{self.workers} local process(es)" if self.workers > 1 and self.worth_processes() else "this process"

    def _path(self, index: int, identity: str) -> Path:
        return self.folder / f"{index:07d}-{digest_of_inputs([self.settings, identity])}.chunk"

    def _keep_only(self, expected: set[str]) -> None:
        """Remove the chunk files of other runs' corpora or settings (and temporaries of a killed write)."""
        if not self.folder.is_dir():
            return
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name not in expected:
                    Path(entry.path).unlink(missing_ok=True)

    def results_of(self, function: Callable[[Any], Any], pairs: Iterable[tuple[Any, str]],
                   fresh: Callable[[Any, Any], bool] | None = None) -> Iterator[Any]:
        """`function(chunk)` of every (chunk, identity) pair, in order (read back where a run before
        finished it, unless `fresh(chunk, result)` says its inputs changed since: then done again
        here). `pairs` may be a stream: taken as the workers are ready for them, a window ahead of the
        result being yielded, never all at once."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resumed = 0
        kept: list[str] = []  # this run's chunk file names (a few bytes a chunk, not a file)
        limit = max(1, self.window * (self.workers if not self.scheduler else max(self.workers, 2)))
        ahead: deque[tuple[Path, Any, Future | None]] = deque()  # in order: (file, chunk, its future or None)
        pairs = iter(pairs)
        stack = contextlib.ExitStack()
        submit = None
        in_flight = 0

        def take() -> None:  # chunks a window ahead: submitted, or noted as kept by a run before
            nonlocal submit, in_flight
            while in_flight < limit and len(ahead) < limit + READ_AHEAD and (pair := next(pairs, None)):
                chunk, identity = pair
                path = self._path(len(kept), identity)
                kept.append(path.name)
                if path.exists():
                    ahead.append((path, chunk, None))
                    continue
                if submit is None:  # the pool starts with the first chunk to do (none when all are kept)
                    submit = stack.enter_context(self._submitter())
                ahead.append((path, chunk, submit(encoded_call, function, chunk)))  # encoded where it ran
                in_flight += 1

        with stack:
            take()
            while ahead:
                path, chunk, future = ahead.popleft()
                if future is None:
                    value = self._read(path, function, chunk, fresh)
                else:
                    in_flight -= 1
                    encoded = future.result()
                    write_bytes(path, encoded)
                    value = decode(encoded)
                take()
                if not ahead:  # the last: the work's end is settled before it is handed over (a caller
                    stack.close()  # zipping the results with its rows never asks for more)
                    self._ended(kept)
                yield value
            if not kept:
                self._ended(kept)

    def _ended(self, kept: list[str]) -> None:
        self._keep_only(set(kept))
        log.info("%s: %d chunk(s) on %s", self.label, len(kept), self.engine)
        if self.resumed:
            log.info("resuming: %d of %d chunks were finished by a run before", self.resumed, len(kept))

    def _read(self, path: Path, function: Callable[[Any], Any], chunk: Any,
              fresh: Callable[[Any, Any], bool] | None) -> Any:
        """A run before's result of `chunk` (counted in `resumed`); done again here, rarely, when it
        does not read back (the file is written without fsync: after a power cut it may be empty or
        cut short) or `fresh` finds the chunk's inputs changed since (or cannot read the result)."""
        try:
            value = decode(path.read_bytes())
            if fresh is None or fresh(chunk, value):
                self.resumed += 1
                return value
            log.info("chunk %s: its inputs changed since it was done: done again", path.name)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            log.info("chunk %s does not read back (%s): done again", path.name, type(error).__name__)
        encoded = encoded_call(function, chunk)
        write_bytes(path, encoded)
        return decode(encoded)

    def _submitter(self):

        @contextlib.contextmanager
        def in_process():
            keep_freed_memory()  # as in a worker: files of one size decoded one after another
            class Done(Future):
                def __init__(self, value: Any) -> None:
                    super().__init__()
                    self.set_result(value)

            yield lambda function, *args: Done(function(*args))

        @contextlib.contextmanager
        def local_pool():
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            processes = min(self.workers, self.chunks_expected())
            threads = max(1, resolve_workers("auto") // processes)  # the cores shared, not oversubscribed
            with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("forkserver"),
                                     initializer=share_cores, initargs=(threads,)) as pool:
                yield pool.submit

        @contextlib.contextmanager
        def dask():
            try:
                from distributed import Client
            except ImportError:  # pragma: no cover - a dependency of the project
                raise PipelineError("a Dask scheduler is named but `distributed` is not installed") from None
            try:
                client = Client(self.scheduler, timeout="30s", set_as_default=False)
            except (OSError, TimeoutError) as error:
                raise PipelineError(f"cannot reach the Dask scheduler {self.scheduler} ({error}); start it, or "
                                    f"unset the section's `scheduler` and ${SCHEDULER_ENV} to run locally") from None
            with client:
                yield lambda function, *args: client.submit(function, *args, pure=False)

        if self.scheduler:
            return dask()
        several = self.workers > 1 and self.chunks_expected() > 1
        return local_pool() if several and self.worth_processes() else in_process()

    def chunks_expected(self) -> int:
        """Chunks the work makes, as far as `chunk_length` was told (all the items, or the first
        LOOKAHEAD of a longer stream: then at least that many)."""
        if self.items is None:
            return self.workers
        return -(-self.items // self.length)

    def worth_processes(self) -> bool:
        """With `workers: auto`, processes only for AUTO_MIN_ITEMS sources or more: each worker pays its
        own start and imports (seconds for MONAI and torch), more than a small corpus saves."""
        return self.chosen or self.items is None or self.items >= AUTO_MIN_ITEMS

    def finish(self) -> None:
        """The stage's output is in place: its chunk results are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for part in self.parts:
            part.finish()


_BLOB = "__blob__"


_MAGIC = b"SSLCHUNK1\n"


def encode(value: Any) -> bytes:
    """`value` (JSON-ready, `bytes` anywhere in it) as bytes: a magic line, the JSON text (sorted keys;
    each `bytes` value replaced by its blob's number) and the blobs, each behind its 8-byte length.
    Plain data only: reading it back runs nothing (never a pickle)."""
    blobs: list[bytes] = []

    def lift(item: Any) -> Any:  # json's hook for what it cannot write: bytes become a numbered blob
        if isinstance(item, (bytes, bytearray, memoryview)):
            blobs.append(bytes(item))
            return {_BLOB: len(blobs) - 1}
        return str(item)

    text = json.dumps(value, sort_keys=True, default=lift).encode()
    parts = [_MAGIC, len(text).to_bytes(8, "little"), text]
    for blob in blobs:
        parts += [len(blob).to_bytes(8, "little"), blob]
    return b"".join(parts)


def decode(data: bytes) -> Any:
    """`encode`'s value back; ValueError when `data` is not a whole chunk result."""
    view, at = memoryview(data), len(_MAGIC)
    if bytes(view[:at]) != _MAGIC:
        raise ValueError("not a chunk result")

    def take() -> bytes:
        nonlocal at
        if at + 8 > len(view):
            raise ValueError("cut short")
        size = int.from_bytes(view[at:at + 8], "little")
        if at + 8 + size > len(view):
            raise ValueError("cut short")
        at += 8 + size
        return bytes(view[at - size:at])

    text = take()
    blobs: list[bytes] = []
    while at < len(view):
        blobs.append(take())

    if not blobs:  # no hook: json's C decoder alone (a Python call a JSON object cost seconds in ingest)
        return json.loads(text)

    def lower(item: dict) -> Any:
        return blobs[item[_BLOB]] if len(item) == 1 and _BLOB in item else item

    return json.loads(text, object_hook=lower)


def encoded_call(function: Callable[[Any], Any], chunk: Any) -> bytes:
    """`function(chunk)`, encoded in the process that ran it (the stage's own then only writes it)."""
    return encode(function(chunk))


def write_bytes(path: Path, data: bytes) -> None:
    """Written under a temporary name and renamed: never a half-written file under `path` while the
    machine runs. Not fsynced (working state; `_read` does a chunk again when it does not read back)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def chunked_work(cfg: Any, paths: Any, stage: str, settings: Any, max_items: int = 64) -> ChunkedWork:
    """The ChunkedWork of a data stage (`ingest`, `preprocess`) of one domain, run as its section says
    (`max_items`: the most items to a chunk when its `chunk_size` is auto)."""
    section = getattr(cfg, stage)
    return ChunkedWork(paths.work(stage), settings, workers=getattr(section, "workers", 1),
                       scheduler=getattr(section, "scheduler", None), chunk_size=getattr(section, "chunk_size", "auto"),
                       label=f"{stage} {paths.domain}", max_items=max_items)

