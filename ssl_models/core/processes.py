"""Whether a process still runs (the one check behind every "left by a killed writer" cleanup), and
the signal the kernel sends a process when its parent dies."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterator


def process_alive(pid: int) -> bool:
    """True while `pid` runs (this process included; another user's live process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parent_death_signal(signum: int | None = None) -> int:
    """On Linux, prctl(PR_SET_PDEATHSIG, signum) when given: the kernel sends `signum` to this
    process when its parent (thread) exits. Returns the signal set before (0 for none, and always
    0 elsewhere, where nothing is set)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(before), 0, 0, 0)  # PR_GET_PDEATHSIG
    if signum is not None:
        libc.prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
    return before.value


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox", "ash"})


def shell_wrapper_parent() -> int | None:
    """The pid of the process that started our parent, when our parent is a shell running one
    command string (`sh -c CMD`) that did not exec it (dash keeps itself as the parent: DVC runs
    stage commands as `$SHELL -c CMD`, /bin/sh where SHELL is unset). None otherwise."""
    import psutil

    try:
        parent = psutil.Process(os.getppid())
        command = parent.cmdline()
        if os.path.basename(command[0] if command else parent.name()) not in SHELLS or "-c" not in command:
            return None
        return parent.ppid() or None
    except (psutil.Error, OSError):
        return None


def on_process_exit(pid: int, signum: int) -> Callable[[], None] | None:
    """Send this process `signum` when process `pid` ends (a daemon thread waits on its pidfd:
    no polling). Returns what stops the watch (the signal is then never sent), or None where `pid`
    cannot be watched (no pidfd, or it is already gone)."""
    import select
    import signal
    import threading

    if not hasattr(os, "pidfd_open"):
        return None
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:  # ended already
        os.kill(os.getpid(), signal.Signals(signum))
        return None
    except OSError:
        return None
    stopped = threading.Event()

    def wait() -> None:
        try:
            select.select([descriptor], [], [])
        finally:
            os.close(descriptor)
        if not stopped.is_set():
            os.kill(os.getpid(), signal.Signals(signum))

    threading.Thread(target=wait, name=f"watch-{pid}", daemon=True).start()
    return stopped.set


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 * 2**20


def keep_freed_memory(trim_threshold: int = 2**30) -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB in the process (and up to
    `trim_threshold` bytes free at the top of its heap) instead of handing them back to the
    system, as PyTorch's CUDA caching allocator does on the GPU. A training loop frees and
    allocates batches and activations of the same sizes every step: handed back, each one is
    faulted in again page by page (measured: building 8 medical batches back to back cost 1.0 ms
    per batch, 0.5 with the memory kept); a data stage decodes and resamples files of one size
    after another (3D preprocess of 96 volumes in one process: 22.0 s -> 19.4 s). Returns False
    where there is no glibc (the settings are glibc's; jemalloc or tcmalloc preloaded by the user
    ignore them, as they should)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


YOUNG_COLLECTION_EVERY = 100_000  # container allocations between two young collections (CPython's default: 700)


def collect_less() -> tuple[int, int, int]:
    """Python's cyclic garbage collector run less often: its youngest generation collected every
    YOUNG_COLLECTION_EVERY allocations of container objects instead of 700, the older ones in the
    same proportions as before. A data stage makes a few short-lived lists and dicts a record
    (a chunk's JSON read back, a row, a manifest line): by default a collection ran every hundred
    records or so. Legal ingest of 200,000 texts in one process took 15.4 s against 17.7 s (idle,
    best of 3 alternated; BENCHMARKS.md). What those records hold is freed by reference counting as
    it goes; only reference cycles wait longer to be freed. Returns the thresholds set before."""
    import gc

    before = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *before[1:])
    return before


@contextlib.contextmanager
def collecting_less() -> Iterator[None]:
    """`collect_less` while the block runs, the thresholds before set back after it (a test runs
    many stages in one process)."""
    import gc

    before = collect_less()
    try:
        yield
    finally:
        gc.set_threshold(*before)
