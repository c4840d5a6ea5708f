"""Pseudonyms for private data: salted hashes that stand in for file names and patient ids.

A key, a group or a patient id of a domain that pseudonymises never reaches a manifest, shard,
log, report or lineage record in clear; what does is `HMAC-SHA256(salt, value)`, truncated.
The salt is a secret kept in a file outside version control (created on first use), so
nobody without it can test a guessed name against a pseudonym, while the same data keeps
the same pseudonyms from run to run on the machine that holds it. It is the owner's alone
(mode 0600): a salt others may read is made so again with a warning, one owned by another
user is refused. A new salt changes every pseudonym, so once outputs were made with one, a
new one is made only on purpose (`new_salt`), never because the file went missing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ssl_models.core.errors import PipelineError
from ssl_models.core.processes import process_alive

log = logging.getLogger("privacy")


@dataclass
class PrivacyConfig:
    """`pseudonymise`: null follows the domain (on for medical data); `salt_file`: the secret."""

    pseudonymise: bool | None = None
    salt_file: str = ".secrets/pseudonym-salt"


def load_salt(path: Path, create: bool = True) -> bytes:
    """The salt in `path`; a new random one is written (owner-readable only) when absent.

    Two first runs at once both find no salt: each writes a complete salt to a temporary file of
    its own and links it to `path`; the link fails for all but one (it never replaces a file),
    and the others read the winner's salt, which is complete before it appears under its name."""
    if not path.exists():
        if not create:
            raise PipelineError(f"salt file {path} not found: pseudonyms cannot be recomputed without it; put it "
                                "back from a backup, or make a new one on purpose with `ssl-pipeline ingest DOMAIN "
                                "--new-salt` (every pseudonym changes, and every stage from ingest on re-runs)")
        _create_salt(path)
    keep_owner_only(path)
    salt = path.read_bytes().strip()
    if len(salt) < 16:
        raise PipelineError(f"salt file {path} holds {len(salt)} bytes; it needs at least 16 "
                            "(delete it to have a new one made)")
    return salt


def new_salt(path: Path) -> bytes:
    """Make a new salt in `path` on purpose (where it went missing after outputs were made with
    the old one); an existing salt is never replaced: it is refused with one line."""
    if path.exists() or path.is_symlink():
        raise PipelineError(f"salt file {path} exists; a new salt is made only where none is (move the old "
                            "one aside first if you mean to replace it: every pseudonym changes)")
    _create_salt(path)
    return load_salt(path, create=False)


def keep_owner_only(path: Path) -> None:
    """A salt that group or others may read or write is made the owner's alone again (0600), with a
    warning; one owned by another user cannot be, and is refused."""
    status = path.stat()
    shared = stat.S_IMODE(status.st_mode) & 0o077
    if not shared:
        return
    if status.st_uid != os.geteuid():
        raise PipelineError(f"salt file {path} belongs to another user (uid {status.st_uid}) and others may read "
                            f"it (mode {stat.S_IMODE(status.st_mode):04o}): a secret shared this way protects "
                            "nothing; have its owner run `chmod 600` on it, or use a salt file of your own")
    os.chmod(path, 0o600)
    log.warning("salt file %s was readable or writable by others (mode %04o): made owner-only (0600); "
                "whoever read it can test guessed names against the pseudonyms",
                path, stat.S_IMODE(status.st_mode))


def _remove_dead_writers_temporaries(path: Path) -> None:
    """A run killed while writing the salt leaves `.<name>.tmp-<pid>-<hex>`: removed once its
    process is gone (a live writer's is left to it)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name[len(f".{path.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _create_salt(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new folder for it is the owner's too
    _remove_dead_writers_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a salt another run made first
        except FileExistsError:
            return
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


class Pseudonymiser:
    """`pseudonymiser("patient", "DOE^JOHN") -> "patient-3f9c..."`: the same value and salt give
    the same pseudonym; a kind prefix keeps patient, study and file pseudonyms apart."""

    def __init__(self, salt: bytes) -> None:
        self._salt = salt

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self._salt, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:20]}"


def pseudonymiser(salt_file: str | Path, create: bool = True) -> Pseudonymiser:
    return Pseudonymiser(load_salt(Path(salt_file), create))


def without_names(message: str, paths: list[Path]) -> str:
    """A library's message with every path of `paths` (whole, or its file name) replaced by
    `<file>`: a quarantine reason or log line must not carry a file name."""
    for path in paths:
        for name in sorted({str(path), str(path.resolve()), path.name}, key=len, reverse=True):
            message = message.replace(name, "<file>")
    return message
