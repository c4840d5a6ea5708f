"""Readers for legal text: .txt, .md, .html and .jsonl, with encoding detection."""

from __future__ import annotations

import codecs
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import charset_normalizer

from ssl_models.core.domain import Record, Rejected
from ssl_models.core.errors import UnreadableFileError
from ssl_models.core.hashing import file_contents

TEXT_SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl")
# A text file is read into memory whole (a .jsonl of many documents too): a larger one, a disk
# image or a database dump under a text name, would take the machine's memory. 256 MiB is some
# 100,000 pages of plain text; split bigger collections into several files.
MAX_TEXT_BYTES = 256 * 2 ** 20
# The default of `ingest.max_characters`: one document's characters after decoding. Checked per
# document and per .jsonl record, so preprocess (which reads what ingest accepted) never hands the
# tokenizer a longer string; it tokenises in pieces besides (shards.py).
MAX_DOCUMENT_CHARACTERS = 10_000_000


def too_long(characters: int, max_characters: int) -> str:
    """The reason for a document over `ingest.max_characters`."""
    return (f"text too long ({characters:,} characters exceed ingest.max_characters={max_characters}); "
            "split the document")


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 written without a BOM (some Windows exports): NUL in every other byte of ASCII text."""
    head = raw[:8192]
    if len(head) < 4 or len(head) % 2:
        return None
    for encoding, nul_at in (("utf-16-le", 1), ("utf-16-be", 0)):
        if head[nul_at::2].count(0) > 0.9 * (len(head) // 2) and head[1 - nul_at::2].count(0) == 0:
            try:
                return encoding if raw.decode(encoding) else None
            except UnicodeDecodeError:
                return None
    return None


def decode_text(raw: bytes, fallback_encoding: str) -> tuple[str, str]:
    """Decode bytes as UTF-8 (BOM-aware) or UTF-16 (with a BOM, or detected without one), else the
    detected charset, else `fallback_encoding`. Returns (text, encoding used)."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), "utf-16"
    if b"\x00" in raw:  # anywhere: a NUL in the middle of a text reached the tokenizer before
        encoding = _utf16_without_bom(raw)
        if encoding is None:
            raise UnreadableFileError("binary content (NUL bytes), not text")
        return raw.decode(encoding), encoding
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    best = charset_normalizer.from_bytes(raw).best()
    if best is not None:
        return str(best), best.encoding
    try:
        return raw.decode(fallback_encoding), fallback_encoding
    except (UnicodeDecodeError, LookupError) as error:
        raise UnreadableFileError(f"cannot decode text ({error})") from None


class _TextOfHtml(HTMLParser):
    """Collects the visible text of an HTML page (no script or style)."""

    SKIP = {"script", "style", "head", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _record(key: str, text: str, digest: str, n_bytes: int, fmt: str, encoding: str) -> Record:
    return Record(key=key, sha256=digest, n_bytes=n_bytes,
                  meta={"format": fmt, "encoding": encoding, "characters": len(text)}, content=text)


def read_text_file(path: Path, key: str, text_field: str, fallback_encoding: str, min_characters: int,
                   max_characters: int = MAX_DOCUMENT_CHARACTERS) -> Iterator[Record | Rejected]:
    """Yield one record per document: the file itself, or one per line of a .jsonl file; a
    document (or record) over `max_characters` is refused with its size."""
    taken = file_contents(path)  # ingest read it for its digest just before: not opened again
    try:
        size = len(taken[0]) if taken else path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise UnreadableFileError(f"file too large for a text document ({size:,} bytes, the limit is "
                                      f"{MAX_TEXT_BYTES // 2 ** 20} MiB); split it into several files")
        raw = taken[0] if taken else path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(f"cannot read file ({error.strerror})") from None
    if not raw.strip():
        raise UnreadableFileError("empty file")
    text, encoding = decode_text(raw, fallback_encoding)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(text, key, text_field, encoding, min_characters, max_characters)
        return
    if suffix in (".html", ".htm"):
        text = html_to_text(text)
    if len(text) > max_characters:
        raise UnreadableFileError(too_long(len(text), max_characters))
    if len(text.strip()) < min_characters:
        raise UnreadableFileError(f"text too short ({len(text.strip())} characters < {min_characters})")
    yield _record(key, text, taken[1] if taken else hashlib.sha256(raw).hexdigest(), len(raw), suffix.lstrip("."),
                  encoding)


def _read_jsonl(text: str, key: str, text_field: str, encoding: str, min_characters: int,
                max_characters: int) -> Iterator[Record | Rejected]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record_key = f"{key}#L{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield Rejected(record_key, f"invalid JSON ({error.msg})")
            continue
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            yield Rejected(record_key, f"no string field {text_field!r} (set ingest.text_field)")
            continue
        if len(value) > max_characters:
            yield Rejected(record_key, too_long(len(value), max_characters))
            continue
        if len(value.strip()) < min_characters:
            yield Rejected(record_key, f"text too short ({len(value.strip())} characters)")
            continue
        if "\x00" in value:  # a JSON `\u0000` escape: binary data stored as a string
            yield Rejected(record_key, "binary content (NUL characters), not text")
            continue
        data = value.encode("utf-8")
        yield _record(record_key, value, hashlib.sha256(data).hexdigest(), len(data), "jsonl", encoding)
