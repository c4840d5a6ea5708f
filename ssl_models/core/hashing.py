"""Content hashes: of files (streamed), of byte strings, and of a set of named hashes."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(hashes: dict[str, str]) -> str:
    """One digest for a set of (name, hash) pairs, independent of their order."""
    return hashlib.sha256("\n".join(f"{k}:{v}" for k, v in sorted(hashes.items())).encode()).hexdigest()


# --- digests a stage already took, trusted while the file is untouched ---------------------------

_CACHE: contextvars.ContextVar[HashCache | None] = contextvars.ContextVar("ssl_pipeline_hash_cache", default=None)


class HashCache:
    """sha256 digests of files this machine hashed, keyed by (device, inode) and trusted while the
    file's size, modification time and change time (ns) are those seen when it was hashed, as
    DVC's own state database does. Any write through the file system changes the change time
    (even a write that puts the modification time back), so an edited or damaged-by-a-program
    file is hashed again; only corruption below the file system (bit rot) passes, which
    `ssl-pipeline lineage verify` catches by re-reading everything. A sqlite file in the
    workspace: no path, no name, nothing private; unreadable, it is set aside and rebuilt."""

    FLUSH_EVERY = 10_000  # digests held before they are written: a bounded buffer, one commit each

    def __init__(self, path: Path) -> None:
        self.path, self.pending = path, []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)  # digests of a private corpus' files: the owner's only
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError:  # not a database (damaged): set aside, rebuilt empty
            path.unlink(missing_ok=True)
            path.touch(mode=0o600)
            self.db = self._open(path)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS digests (dev INTEGER, ino INTEGER, size INTEGER, "
                   "mtime INTEGER, ctime INTEGER, sha256 TEXT, PRIMARY KEY (dev, ino))")
        return db

    @staticmethod
    def stamp(status: os.stat_result) -> tuple[int, int, int, int, int]:
        return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)

    def known(self, status: os.stat_result) -> str | None:
        dev, ino, size, mtime, ctime = self.stamp(status)
        row = self.db.execute("SELECT size, mtime, ctime, sha256 FROM digests WHERE dev = ? AND ino = ?",
                              (dev, ino)).fetchone()
        return row[3] if row is not None and tuple(row[:3]) == (size, mtime, ctime) else None

    def remember(self, stamp: tuple[int, int, int, int, int], digest: str) -> None:
        self.pending.append((*stamp, digest))
        if len(self.pending) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", self.pending)
            self.pending = []

    def sha256(self, path: Path) -> str:
        known = self.known(os.stat(path))
        if known is not None:
            return known
        stamp, digest = stamped_sha256(path)
        if stamp is not None:
            self.remember(stamp, digest)
        return digest


RACY_NS = 100_000_000  # a file changed this close before it was hashed is not trusted by its stamp


def stamped_sha256(path: Path) -> tuple[tuple[int, int, int, int, int] | None, str]:
    """(the file's HashCache stamp, its sha256); the stamp is None when it cannot vouch for the digest:
    the file changed while it was read, or had changed under RACY_NS before (file times tick
    coarsely, so a write in the same tick after the read would leave the same stamp)."""
    read = stamped_read(path)
    return read.stamp, read.digest


class StampedRead(NamedTuple):
    stamp: tuple[int, int, int, int, int] | None  # the HashCache stamp, None when it cannot vouch for the digest
    digest: str
    data: bytes | None  # the bytes, when the file held at most `keep` of them
    seen: tuple[int, int]  # (size, modification time in ns) before the read: `file_stamp`'s values


def stamped_read(path: Path, keep: int = 0) -> StampedRead:
    """`stamped_sha256`, and the file's bytes when it holds at most `keep` of them (read whole, then
    hashed: the bytes are those the digest is of), else None (streamed through the hash)."""
    started = time.time_ns()
    before = os.stat(path)
    data = None
    if 0 < keep and before.st_size <= keep:
        with open(path, "rb") as handle:
            data = handle.read()
        digest = sha256_bytes(data)
    else:
        digest = sha256_file(path)
    after = os.stat(path)
    stamp = HashCache.stamp(before)
    trusted = stamp == HashCache.stamp(after) and before.st_ctime_ns < started - RACY_NS
    return StampedRead(stamp if trusted else None, digest, data, (before.st_size, before.st_mtime_ns))


@contextlib.contextmanager
def hash_cache(path: Path) -> Iterator[HashCache]:
    """`file_sha256` trusts and fills the cache at `path` in the block."""
    cache = HashCache(path)
    token = _CACHE.set(cache)
    try:
        yield cache
    finally:
        _CACHE.reset(token)
        with contextlib.suppress(sqlite3.Error):
            cache.flush()
        cache.db.close()


_TAKEN: contextvars.ContextVar[dict[str, tuple[str, bytes | None]] | None] = contextvars.ContextVar(
    "ssl_pipeline_taken", default=None)


@contextlib.contextmanager
def taken_by_ingest(files: dict[str, tuple[str, bytes | None]]) -> Iterator[None]:
    """In the block, `file_sha256` and `file_contents` answer from `files` (path -> the sha256 this
    process has just taken of it, and the bytes it read whole for it, or None): a reader that
    records a file's hash, or decodes a small file, does not read the file a second time."""
    token = _TAKEN.set(files)
    try:
        yield
    finally:
        _TAKEN.reset(token)


def file_contents(path: Path) -> tuple[bytes, str] | None:
    """(bytes, sha256) of `path` read whole just before in the block (`taken_by_ingest`), else None."""
    taken = (_TAKEN.get() or {}).get(os.fspath(path))
    return None if taken is None or taken[1] is None else (taken[1], taken[0])


def file_sha256(path: Path) -> str:
    """sha256 of a file: one just taken in the block (`taken_by_ingest`), else through the block's
    HashCache when one is set (a stage's start checks its inputs without reading them again), else read."""
    taken = (_TAKEN.get() or {}).get(os.fspath(path))
    if taken is not None:
        return taken[0]
    cache = _CACHE.get()
    return sha256_file(path) if cache is None else cache.sha256(path)


def remember_digest(stamp: tuple[int, int, int, int, int] | None, digest: str | None) -> None:
    """Record a digest taken elsewhere (an ingest worker) with the file's `HashCache.stamp`."""
    cache = _CACHE.get()
    if cache is not None and stamp is not None and digest is not None:
        cache.remember(tuple(stamp), digest)
