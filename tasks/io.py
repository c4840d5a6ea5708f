"""Small I/O helpers every stage uses: atomic, durable writes of folders and files, JSON and JSONL.

Every write goes to a temporary name unique to the process (`.<name>.tmp-<pid>-<random>`),
is fsynced, then renamed over the target, and the folder holding it is fsynced, so a kill or a
power cut at any moment leaves either the old complete output or the new complete one, never a
half-written file under the real name. A folder being replaced is first renamed aside
(`.<name>.old-<pid>-<random>`) and deleted only once the new one is in: a kill between the two
renames leaves the old copy aside, and `clean_stale` puts it back at the next start.

Inside `private_outputs` (a stage of a domain that pseudonymises), what is written is the owner's
alone: the umask is 077, and every file these helpers put in place is 0600 (its owner bits kept)
and every folder 0700, whatever mode a library gave it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

from ssl_models.core.processes import process_alive

# `.<target name>.<tmp|old>-<pid>[-<random>]`: what this module leaves behind when killed
# (the random part is absent in leftovers of the older helpers, `.shards.tmp-<pid>`)
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


# whether this process writes a pseudonymising domain's outputs now (`private_outputs`)
_PRIVATE = False


@contextlib.contextmanager
def private_outputs(enabled: bool = True) -> Iterator[None]:
    """When `enabled` (the domain pseudonymises), what this process and the processes it starts
    create in the block is the owner's alone: umask 077, so a library's files and new folders are
    0600/0700 (loader workers and torchrun's ranks inherit it), and `atomic_dir`/`atomic_file`
    take group and others' bits off what they put in place (a file copied with its source's 0644
    included). Not enabled: nothing changes."""
    global _PRIVATE
    if not enabled:
        yield
        return
    previous_mask, previous = os.umask(0o077), _PRIVATE
    os.umask(previous_mask | 0o077)  # a stricter umask the user set stays
    _PRIVATE = True
    try:
        yield
    finally:
        _PRIVATE = previous
        os.umask(previous_mask)


def _owner_only(path: Path) -> None:
    """`path` (a file, or a folder and all below it) readable by its owner only: folders 0700,
    files their owner's bits alone (0644 -> 0600, a read-only 0444 -> 0400). Links are left."""
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o700)
        return
    for current, folders, files in os.walk(path):
        os.chmod(current, 0o700)
        for name in files:
            file = Path(current) / name
            if not file.is_symlink():
                os.chmod(file, stat.S_IMODE(file.stat().st_mode) & 0o700)


# this process's temporaries and aside copies that are in use now: any other leftover carrying
# this pid is stale (a killed run whose pid came round again, as in a restarted container)
_IN_USE: set[Path] = set()


@contextlib.contextmanager
def _unique(target: Path, kind: str) -> Iterator[Path]:
    """A name for a temporary (or an aside copy) of `target` unique to this process and this write,
    which `clean_stale` leaves alone while the block runs."""
    path = target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    _IN_USE.add(path)
    try:
        yield path
    finally:
        _IN_USE.discard(path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder's fsync makes renames in it durable)."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder`, deepest first, then `folder` itself."""
    for current, _, files in os.walk(folder, topdown=False):
        for name in files:
            file = Path(current) / name
            if not file.is_symlink():
                fsync_path(file)
        fsync_path(Path(current))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(folder: Path, recursive: bool = False) -> list[str]:
    """Remove the temporaries that killed processes left in `folder` (`.X.tmp-<pid>-*`), and put
    back an output that a kill between two renames left only aside (`.X.old-<pid>-*` with `X`
    missing). Leftovers of live processes, and this process's writes in progress, are not touched. Returns what was done, one line each."""
    done: list[str] = []
    if not folder.is_dir():
        return done
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None:
            if recursive and entry.is_dir() and not entry.is_symlink():
                done.extend(clean_stale(entry, recursive=True))
            continue
        pid = int(match["pid"])
        if entry in _IN_USE if pid == os.getpid() else process_alive(pid):
            continue
        target = folder / match["target"]
        if match["kind"] == "old" and not target.exists():
            entry.rename(target)
            fsync_path(folder)
            done.append(f"restored {target} from the copy a killed run left aside")
        else:
            _remove(entry)
            done.append(f"removed {entry.name}, left in {folder} by a killed run")
    return done


def replace_path(new: Path, target: Path) -> None:
    """Rename the complete, fsynced `new` to `target`, keeping the old `target` until `new` is in."""
    parent = target.parent
    if not target.is_dir() or target.is_symlink():
        os.replace(new, target)  # a file target is replaced in one step by the rename itself
        fsync_path(parent)
        return
    with _unique(target, "old") as aside:
        target.rename(aside)
        fsync_path(parent)
        os.replace(new, target)
        fsync_path(parent)
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only when the block completes,
    so a killed stage never leaves a half-written artifact under the real name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)  # an aside copy put back, stale temporaries dropped
    with _unique(target, "tmp") as tmp:
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if _PRIVATE:
            _owner_only(tmp)
        fsync_tree(tmp)
        replace_path(tmp, target)


def _inside_own_temporary(path: Path) -> bool:
    """Whether `path` lies in a folder this process is filling under `atomic_dir`, which fsyncs
    the whole folder before renaming it in: a file there needs no rename or fsync of its own."""
    for part in path.parent.parts:
        match = _LEFTOVER.match(part)
        if match and match["kind"] == "tmp" and int(match["pid"]) == os.getpid():
            return True
    return False


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library to write (`torch.save`, `save_file`);
    it is fsynced and renamed to `path` when the block completes, removed when it fails."""
    with _unique(path, "tmp") as tmp:
        try:
            yield tmp
            if _PRIVATE:
                _owner_only(tmp)
            if not _inside_own_temporary(path):
                fsync_path(tmp)
        except BaseException:
            _remove(tmp)
            raise
        if _inside_own_temporary(path):
            os.replace(tmp, path)
        else:
            replace_path(tmp, path)


def write_text(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file renamed over it: never a half-written file."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, streamed to a temporary file renamed over `path` when complete."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, default=str) + "\n")


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Lines of text (each with its newline) streamed to a temporary file renamed over `path` when complete."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file. The rows' keys are interned, so a million manifest rows share
    one string per field name instead of each holding its own (a row of ten fields: 0.73 KB
    instead of 1.27 KB; reading takes about 1.5 times as long)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """`read_jsonl`'s rows one at a time, as the file is read."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield _DECODER.decode(line)


def _interned(pairs: list[tuple[str, Any]], intern: Any = sys.intern) -> dict[str, Any]:
    return {intern(key): value for key, value in pairs}


_DECODER = json.JSONDecoder(object_pairs_hook=_interned)


class JsonlRows(Sequence):
    """The rows of a JSON-lines file as a sequence that holds each line's offset (8 bytes a row),
    never the rows: iterating streams the file, a row asked by its index is read from its line.
    A manifest of a million rows costs 8 MB so, against 0.73 GB for `read_jsonl`'s list; each
    pass over it decodes the rows again (about 4 us a row)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offsets = Path(path), array("Q")
        with open(path, "rb") as handle:
            at = 0
            for line in handle:
                if line.strip():
                    self._offsets.append(at)
                at += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter_jsonl(self.path)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[index])
            return _DECODER.decode(handle.readline().decode("utf-8"))
