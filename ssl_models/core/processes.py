"""Whether a process still runs: the one check behind every "left by a killed writer" cleanup."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while `pid` runs (this process included; another user's live process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
