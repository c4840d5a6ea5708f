"""Atomic, durable writes: a kill at any point leaves the old output or the new one, never neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks import io
from tasks.io import atomic_dir, clean_stale, read_json, write_json, write_jsonl, write_text

REPO = Path(__file__).resolve().parents[2]


def killed_child(code: str) -> None:
    """Run `code` in a fresh Python process that SIGKILLs itself where the code says `die()`."""
    prelude = "import os, signal\nfrom pathlib import Path\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == -9, result.stderr


def test_a_kill_between_the_two_renames_leaves_the_old_folder_aside_and_the_next_start_restores_it(tmp_path: Path) -> None:
    target = tmp_path / "shards"
    with atomic_dir(target) as out:
        (out / "part.arrow").write_text("old")
    killed_child(f"""
        import tasks.io as io
        target = Path({str(target)!r})
        real_replace = io.os.replace
        def replace(new, old):
            die()  # after the old folder was renamed aside, before the new one is in
        io.os.replace = replace
        with io.atomic_dir(target) as out:
            (out / "part.arrow").write_text("new")
    """)
    assert not target.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert any(".shards.old-" in name for name in leftovers) and any(".shards.tmp-" in name for name in leftovers)
    done = clean_stale(tmp_path)
    assert (target / "part.arrow").read_text() == "old"
    assert any("restored" in line for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_a_kill_inside_the_block_keeps_the_old_output_and_its_temporary_is_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "manifest"
    with atomic_dir(target) as out:
        write_text(out / "manifest.jsonl", "old\n")
    killed_child(f"""
        import tasks.io as io
        with io.atomic_dir(Path({str(target)!r})) as out:
            (out / "manifest.jsonl").write_text("half of the new one")
            die()
    """)
    assert (target / "manifest.jsonl").read_text() == "old\n"
    assert len(list(tmp_path.glob(".manifest.tmp-*"))) == 1
    # the next atomic_dir on the same target cleans it before writing
    with atomic_dir(target) as out:
        write_text(out / "manifest.jsonl", "new\n")
    assert (target / "manifest.jsonl").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest"]


def test_a_kill_before_a_file_rename_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"macro_f1": 0.5})
    killed_child(f"""
        import tasks.io as io
        io.os.replace = lambda new, old: die()
        io.write_json(Path({str(path)!r}), {{"macro_f1": 0.9}})
    """)
    assert read_json(path) == {"macro_f1": 0.5}
    assert [p.name for p in tmp_path.glob(".metrics.json.tmp-*")]
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_leftovers_of_live_processes_are_kept_and_old_style_ones_removed(tmp_path: Path) -> None:
    """Also this process's own: a write in progress is kept, a leftover of an earlier run whose pid
    came round again (a restarted container) is not."""
    mine = tmp_path / f".shards.tmp-{os.getpid()}-abcd1234"
    mine.mkdir()
    with atomic_dir(tmp_path / "plots") as writing:
        clean_stale(tmp_path)
        assert writing.is_dir() and not mine.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive = tmp_path / f".plots.tmp-{sleeper.pid}-0badf00d"
        alive.mkdir()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        legacy = tmp_path / f".shards.tmp-{dead}"  # what the helpers before this one left
        legacy.mkdir()
        (tmp_path / "data.txt").write_text("not a leftover")
        clean_stale(tmp_path)
        assert alive.exists() and not legacy.exists()
        assert (tmp_path / "data.txt").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    renamed: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(new: str | Path, old: str | Path) -> None:
        renamed.append(str(old))
        real_replace(new, old)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    target = tmp_path / "shards"
    with atomic_dir(target) as out:
        (out / "labeled").mkdir()
        (out / "labeled" / "data.arrow").write_bytes(b"x" * 100)
        tmp = out
    names = [Path(p).name for p in synced]
    assert "data.arrow" in names and "labeled" in names and tmp.name in names and tmp_path.name in names
    assert renamed == [str(target)]
    synced.clear()
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"a": 2}])
    assert any(".rows.jsonl.tmp-" in p for p in synced) and str(tmp_path) in synced
    assert [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [{"a": 1}, {"a": 2}]


def test_a_failing_block_leaves_the_old_output_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with atomic_dir(target) as out:
        (out / "report.md").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as out:
        (out / "report.md").write_text("new")
        raise RuntimeError("the stage failed")
    assert (target / "report.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_read_jsonl_rows_share_their_field_names_and_read_as_json_does(tmp_path: Path) -> None:
    rows = [{"key": f"doc-{i}.txt", "split": "train", "meta": {"bytes": i, "format": "txt"}, "label": None,
             "twice": 1} for i in range(3)]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + '\n\n{"twice": 1, "twice": 2}\n', encoding="utf-8")
    read = io.read_jsonl(path)
    assert read == [*rows, {"twice": 2}]  # a blank line skipped; a repeated key keeps the last, as json does
    first, second = (next(key for key in row if key == "split") for row in read[:2])
    assert first is second  # one string for the field name, not one a row
    nested = [next(key for key in row["meta"] if key == "format") for row in read[:2]]
    assert nested[0] is nested[1]
    path.write_text('{"key": "a"}\n{"key": \n', encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        io.read_jsonl(path)


def test_jsonl_rows_read_each_row_from_its_line_and_hold_only_offsets(tmp_path: Path) -> None:
    from tasks.io import JsonlRows, read_jsonl, write_jsonl

    rows = [{"key": f"doc-{i}.txt", "split": "train" if i % 3 else "test", "text": "é" * i} for i in range(50)]
    path = tmp_path / "manifest.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as handle:
        handle.write("\n")  # a blank line is no row, as for read_jsonl
    lazy = JsonlRows(path)
    assert len(lazy) == 50 and list(lazy) == list(lazy) == read_jsonl(path) == rows
    assert lazy[7] == rows[7] and lazy[-1] == rows[-1] and lazy[3:6] == rows[3:6]
    import tracemalloc

    write_jsonl(path, [{**row, "key": f"doc-{i}.txt"} for i in range(5000) for row in rows[:1]])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        lazy = JsonlRows(path)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(lazy) == 5000 and held < 5000 * 16, f"{held / 5000:.0f} bytes a row"  # read_jsonl: ~500


def test_sources_are_found_in_one_walk_in_manifest_order_and_again_out_of_it() -> None:
    """Preprocess' locate: asked in the walk's order it drops every source it passed (one held);
    asked out of order it walks again, once, and keeps them all; a source gone is one clear error."""
    from ssl_models.core.errors import PipelineError
    from tasks.stages.preprocess import SourcesInOrder

    walks = []

    def walk():
        walks.append(1)
        yield "listed", "a", None
        for key in ("a", "b", "c", "d"):
            yield "source", key, f"source {key}"

    locate = SourcesInOrder(walk, "gone: re-run ingest")
    assert [locate({"source": key}) for key in ("a", "a", "c", "d")] == ["source a", "source a", "source c",
                                                                           "source d"]
    assert len(walks) == 1 and locate.every is None
    assert locate({"source": "b"}) == "source b" and len(walks) == 2 and len(locate.every) == 4
    with pytest.raises(PipelineError, match="gone: re-run ingest"):
        locate({"source": "e"})
