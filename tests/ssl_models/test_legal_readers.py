from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_models.core.domain import Record, Rejected
from ssl_models.core.errors import UnreadableFileError
from ssl_models.legal_text.readers import read_text_file


def read(path: Path) -> list:
    return list(read_text_file(path, path.name, "text", "latin-1", 1))


def test_reads_utf8_latin1_and_utf16_to_the_same_text(tmp_path: Path) -> None:
    # A real paragraph: single-byte encodings can only be told apart with some context.
    text = ("Le présent contrat est conclu entre les parties désignées ci-après. Le licencié s'engage à "
            "respecter les conditions générales décrites à l'article 3, à ne pas céder ses droits à un "
            "tiers sans l'accord préalable écrit du concédant, et à régler les redevances à l'échéance "
            "prévue. Toute clause déclarée nulle n'entraîne pas la nullité du contrat.")
    for name, encoding in [("a.txt", "utf-8"), ("b.txt", "cp1252"), ("c.txt", "utf-16")]:
        (tmp_path / name).write_bytes(text.encode(encoding))
    decoded = {p.name: read(p)[0] for p in sorted(tmp_path.iterdir())}
    assert all(r.content.strip() == text for r in decoded.values())
    assert decoded["a.txt"].meta["encoding"] == "utf-8"
    assert decoded["c.txt"].meta["encoding"] == "utf-16"
    assert decoded["a.txt"].sha256 != decoded["b.txt"].sha256  # content hash is of the bytes


def test_html_keeps_visible_text_only(tmp_path: Path) -> None:
    page = tmp_path / "judgment.html"
    page.write_text("<html><head><title>x</title><style>p{}</style></head><body><h1>Judgment</h1>"
                    "<script>var a=1;</script><p>The appeal is <b>dismissed</b>.</p></body></html>")
    (record,) = read(page)
    assert record.content == "Judgment\nThe appeal is dismissed."
    assert record.meta["format"] == "html"


def test_jsonl_gives_one_record_per_line_and_rejects_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "First clause."}), "{not json", json.dumps({"body": "no text field"}),
             "", json.dumps({"text": "Second clause."})]
    path = tmp_path / "clauses.jsonl"
    path.write_text("\n".join(lines))
    items = read(path)
    records = [i for i in items if isinstance(i, Record)]
    rejected = {i.key: i.reason for i in items if isinstance(i, Rejected)}
    assert [r.key for r in records] == ["clauses.jsonl#L1", "clauses.jsonl#L5"]
    assert [r.content for r in records] == ["First clause.", "Second clause."]
    assert "invalid JSON" in rejected["clauses.jsonl#L2"]
    assert "'text'" in rejected["clauses.jsonl#L3"]


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"   \n", "empty file"),
                                             (b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "binary")])
def test_unusable_files_raise_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UnreadableFileError, match=reason):
        read(path)


def test_a_nul_byte_anywhere_is_binary_but_utf16_without_a_bom_is_text(tmp_path: Path) -> None:
    """A NUL after the first 8 KiB used to pass into the tokenizer; UTF-16 without a BOM (a Windows
    export) used to be refused as binary."""
    late_nul = tmp_path / "late.txt"
    late_nul.write_bytes(b"The recital of the facts. " * 400 + b"\x00" + b"The end.")
    with pytest.raises(UnreadableFileError, match="binary content"):
        read(late_nul)
    for encoding in ("utf-16-le", "utf-16-be"):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes("The lessee waives any right of set-off.".encode(encoding))
        (record,) = read(path)
        assert record.content == "The lessee waives any right of set-off." and record.meta["encoding"] == encoding
    records = tmp_path / "nul.jsonl"
    records.write_text(json.dumps({"text": "a\u0000b"}) + "\n")
    (rejected,) = read(records)
    assert isinstance(rejected, Rejected) and "NUL" in rejected.reason


def test_a_file_too_large_to_hold_in_memory_is_refused_before_reading(tmp_path: Path) -> None:
    import tracemalloc

    from ssl_models.legal_text.readers import MAX_TEXT_BYTES

    huge = tmp_path / "dump.txt"
    with open(huge, "wb") as handle:  # sparse: no disk used
        handle.truncate(MAX_TEXT_BYTES + 1)
    tracemalloc.start()
    with pytest.raises(UnreadableFileError, match=r"too large for a text document \(268,435,457 bytes, the limit is 256 MiB"):
        read(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 ** 20
