"""The project's one exception type for bad input and bad configuration."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can act on: the message names the file or setting and the fix.

    The CLI prints it as one line, never as a traceback.
    """


class UnreadableFileError(Exception):
    """Raised by a domain reader for one bad file; ingest quarantines the file with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
