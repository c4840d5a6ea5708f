from __future__ import annotations

from pathlib import Path

from tasks.lineage import show, verify
from tasks.preprocess import preprocess


def test_verify_passes_then_names_a_changed_raw_file_and_artifact(ingested_project: Path) -> None:
    assert verify(Path("data/legal/shards")) == []
    raw = sorted(Path("data/legal/default/corpus").glob("*.txt"))[3]
    raw.write_text(raw.read_text() + "\nAmended by a later clause.")
    problems = verify(Path("data/legal/shards"))
    assert problems == [f"raw file {raw}: content changed"]
    (Path("data/legal/manifest") / "summary.json").write_text("{}")
    assert "data/legal/manifest/summary.json: content changed" in verify(Path("data/legal/shards"))


def test_rebuilt_upstream_is_detected_and_show_reaches_raw_hashes(ingested_project: Path) -> None:
    from tasks.ingest import ingest

    (Path("data/legal/default/corpus") / "extra.txt").write_text("A new contract appears.")
    ingest("legal")  # the manifest changes, but the shards were made from the old one
    problems = verify(Path("data/legal/shards"))
    assert any("re-made since data/legal/shards was built" in p for p in problems)
    preprocess("legal")
    assert verify(Path("data/legal/shards")) == []
    text = show(Path("data/legal/shards"))
    assert "[preprocess@legal]" in text and "[ingest@legal]" in text and "raw corpus" in text
