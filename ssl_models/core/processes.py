"""Whether a process still runs (the one check behind every "left by a killed writer" cleanup), and
the signal the kernel sends a process when its parent dies."""

from __future__ import annotations

import os
import sys


def process_alive(pid: int) -> bool:
    """True while `pid` runs (this process included; another user's live process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


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
