from __future__ import annotations

from pathlib import Path

from tasks.cli import run_stage
from tasks.lineage import show, verify


def test_verify_passes_then_names_a_changed_raw_file_and_artifact(ingested_project: Path) -> None:
    assert verify(ingested_project / "data/legal/shards", ingested_project) == []
    raw = sorted((ingested_project / "data/legal/default/corpus").glob("*.txt"))[3]
    raw.write_text(raw.read_text() + "\nAmended by a later clause.")
    problems = verify(ingested_project / "data/legal/shards", ingested_project)
    assert problems == [f"raw file {raw.relative_to(ingested_project).as_posix()}: content changed"]
    ((ingested_project / "data/legal/manifest") / "summary.json").write_text("{}")
    assert "data/legal/manifest/summary.json: content changed" in verify(ingested_project / "data/legal/shards", ingested_project)


def test_rebuilt_upstream_is_detected_and_show_reaches_raw_hashes(ingested_project: Path) -> None:
    ((ingested_project / "data/legal/default/corpus") / "extra.txt").write_text("A new contract appears.")
    run_stage("ingest", "legal", ingested_project)  # the manifest changes, but the shards were made from the old one
    problems = verify(ingested_project / "data/legal/shards", ingested_project)
    assert any("re-made since data/legal/shards was built" in p for p in problems)
    run_stage("preprocess", "legal", ingested_project)
    assert verify(ingested_project / "data/legal/shards", ingested_project) == []
    text = show(ingested_project / "data/legal/shards", ingested_project)
    assert "[preprocess@legal]" in text and "[ingest@legal]" in text and "raw corpus" in text
