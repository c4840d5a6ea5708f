"""Ingest's index of the contents kept so far, to drop exact duplicates of a corpus too large to hold.

Each kept row's (sha256, key, manifest line, private group) is appended to a sqlite table on disk
(its line is the table's integer key: appended in order, never a search through a tree of digests
per insert); what is held in memory is the first 8 bytes of each digest with its line, 16 bytes a
row, sorted (numpy) plus the last rows added (a dict of at most MERGE rows, then merged in). A digest whose
8 bytes match is looked up in the table by line and compared whole, so two contents sharing those
bytes are never taken for one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

Kept = tuple[str, int, "str | None"]  # (key, line, private group) of the row holding a content


def _prefix(sha: str) -> int:
    return int(sha[:16], 16) - (1 << 63)  # as a signed 64-bit integer


class ContentIndex:
    MERGE = 8_192  # rows added before they join the sorted arrays (a merge copies them: O(rows))

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; "
                              "CREATE TABLE kept (line INTEGER PRIMARY KEY, sha256 TEXT, key TEXT, grp TEXT); BEGIN;")
        self.prefixes = np.empty(0, dtype=np.int64)  # sorted
        self.lines = np.empty(0, dtype=np.int64)  # the line of each prefix
        self.recent: dict[int, int] = {}  # prefix -> line, added since the last merge

    def close(self) -> None:
        self.db.close()

    def find(self, digests: list[str]) -> dict[str, Kept]:
        """The rows kept so far holding any of `digests` (one query for them all, none when no prefix matches)."""
        if not digests:
            return {}
        asked = np.fromiter((_prefix(sha) for sha in digests), dtype=np.int64, count=len(digests))
        low = np.searchsorted(self.prefixes, asked, side="left")
        high = np.searchsorted(self.prefixes, asked, side="right")
        lines: list[int] = []
        for start, end in zip(low[high > low].tolist(), high[high > low].tolist()):
            lines.extend(self.lines[start:end].tolist())
        lines.extend(line for line in map(self.recent.get, asked.tolist()) if line is not None)
        if not lines:
            return {}
        wanted = set(digests)
        rows = self.db.execute(f"SELECT sha256, key, line, grp FROM kept WHERE line IN ({','.join('?' * len(lines))})",
                               lines)
        return {sha: (key, line, group) for sha, key, line, group in rows if sha in wanted}

    def add(self, rows: list[tuple[str, str, int, str | None]]) -> None:
        """(sha256, key, line, private group) of rows just kept, their lines increasing."""
        self.db.executemany("INSERT INTO kept (sha256, key, line, grp) VALUES (?, ?, ?, ?)", rows)
        for sha, _, line, _ in rows:
            prefix = _prefix(sha)
            if prefix in self.recent or len(self.recent) >= self.MERGE:  # (two prefixes alike: 1 in 2**64)
                self._merge()
            self.recent[prefix] = line

    def _merge(self) -> None:
        pairs = sorted(self.recent.items())
        prefixes = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
        lines = np.fromiter((line for _, line in pairs), dtype=np.int64, count=len(pairs))
        at = np.searchsorted(self.prefixes, prefixes, side="right")
        self.prefixes, self.lines = np.insert(self.prefixes, at, prefixes), np.insert(self.lines, at, lines)
        self.recent = {}
