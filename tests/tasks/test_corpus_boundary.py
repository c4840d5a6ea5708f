"""The corpus folder is a boundary: symlinks leaving it are set aside with their reason unless
`ingest.follow_symlinks` says otherwise (then followed and counted); links inside it keep working;
broken links, link loops and pipes are quarantined, never followed forever, never dropped silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ssl_models.core.config import load_config
from tasks.cli import run_stage
from tasks.io import read_json, read_jsonl
from tasks.lineage import raw_inputs
from tasks.sources import BROKEN_LINK, FOLDER_READ_ALREADY, LEAVES_CORPUS, LINK_LOOP, NOT_A_FILE, corpus_files
from tests.conftest import tiny_params, write_params

SECRET = "Outside text that must not reach the vocabulary: zyxquorum."


def make_linked_corpus(root: Path) -> Path:
    """A corpus of eight texts with links in it: to a file and a folder outside it, to a file
    and a folder inside it, a broken one and a loop."""
    corpus = root / "corpus"
    (corpus / "docs").mkdir(parents=True)
    for i in range(8):
        (corpus / "docs" / f"d{i}.txt").write_text(f"Judgment {i}. The court finds for the claimant {i} times.\n")
    outside = root / "elsewhere" / "DOE_JOHN"
    (outside / "inner").mkdir(parents=True)
    (outside / "private.txt").write_text(SECRET)
    (outside / "inner" / "deeper.txt").write_text(SECRET + " Deeper.")
    (root / "elsewhere" / "single.txt").write_text(SECRET + " Single.")
    (corpus / "outside_file.txt").symlink_to(root / "elsewhere" / "single.txt")
    (corpus / "outside_folder").symlink_to(outside, target_is_directory=True)
    (corpus / "inside_file.txt").symlink_to(Path("docs") / "d0.txt")  # relative, inside the corpus
    (corpus / "inside_folder").symlink_to(Path("docs"), target_is_directory=True)
    (corpus / "docs" / "up").symlink_to(Path(".."), target_is_directory=True)  # a folder above: a loop
    (corpus / "gone.txt").symlink_to(root / "nowhere.txt")
    (corpus / "loop_a.txt").symlink_to(corpus / "loop_b.txt")
    (corpus / "loop_b.txt").symlink_to(corpus / "loop_a.txt")
    return corpus


@pytest.fixture
def linked_project(tiny_project: Path) -> Path:
    make_linked_corpus(tiny_project)
    write_params(tiny_project, tiny_params(corpus="corpus", labels=None, ingest={"max_quarantined_fraction": 0.5}))
    return tiny_project


def test_symlinks_leaving_the_corpus_are_quarantined_not_followed(linked_project: Path) -> None:
    summary = run_stage("ingest", "legal", linked_project)
    manifest_folder = linked_project / "data/legal/manifest"
    keys = {row["key"] for row in read_jsonl(manifest_folder / "manifest.jsonl")}
    quarantine = {q["key"]: q["reason"] for q in read_jsonl(manifest_folder / "quarantine.jsonl")}
    assert quarantine["outside_file.txt"] == LEAVES_CORPUS
    assert quarantine["outside_folder"] == LEAVES_CORPUS
    assert "ingest.follow_symlinks: true" in LEAVES_CORPUS
    assert quarantine["gone.txt"] == BROKEN_LINK
    assert quarantine["loop_a.txt"] == quarantine["loop_b.txt"] == LINK_LOOP
    assert not any(k.startswith("outside_folder/") for k in keys | set(quarantine))  # not walked
    # links inside the corpus still read: the file link as its own key (a copy of d0, dropped as one)
    assert "docs/d0.txt" in keys and summary["duplicates_dropped"] == 1
    assert not any(k.startswith(("inside_folder/", "docs/up/")) for k in keys | set(quarantine))
    written = "".join(p.read_text() for p in manifest_folder.iterdir())
    assert "elsewhere" not in written and "DOE_JOHN" not in written  # no target path anywhere
    record = read_json(manifest_folder / "lineage.json")
    assert "outside_file.txt" not in dict(raw_inputs(record, manifest_folder.parents[2]))  # never read
    assert summary["symlinks_followed_out_of_corpus"] == 0 and summary["records"] == 8


def test_follow_symlinks_reads_outside_targets_and_logs_a_count(linked_project: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg, domain = load_config("legal", linked_project / "params.yaml")
    cfg.ingest.follow_symlinks = True  # the setting as params.yaml gives it (ingest.follow_symlinks: true)
    with caplog.at_level(logging.INFO, logger="ingest"):
        summary = run_stage("ingest", "legal", linked_project, loaded=(cfg, domain))
    keys = {row["key"] for row in read_jsonl(linked_project / "data/legal/manifest/manifest.jsonl")}
    assert {"outside_file.txt", "outside_folder/private.txt", "outside_folder/inner/deeper.txt"} <= keys
    assert summary["symlinks_followed_out_of_corpus"] == 2
    assert "followed 2 symlink(s) leaving the corpus (ingest.follow_symlinks), 3 file(s) read through them" \
        in caplog.text


def test_link_loops_outside_the_corpus_end_and_nothing_is_read_twice(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "b.txt").write_text("b")
    (outside / "sub" / "back_to_outside").symlink_to(outside, target_is_directory=True)  # a loop through the link
    (outside / "to_corpus").symlink_to(corpus, target_is_directory=True)  # back inside: read under own names
    (outside / "to_root").symlink_to(tmp_path, target_is_directory=True)  # holds the corpus: a loop
    (corpus / "out").symlink_to(outside, target_is_directory=True)
    (corpus / "out_again").symlink_to(outside / "sub", target_is_directory=True)
    os.mkfifo(corpus / "pipe.txt")  # reading it would block forever
    listing = corpus_files(corpus, None, follow_symlinks=True)
    assert [p.relative_to(corpus).as_posix() for p in listing.files] == ["a.txt", "out/sub/b.txt"]
    assert dict(listing.set_aside) == {"out/sub/back_to_outside": LINK_LOOP, "out/to_root": LINK_LOOP,
                                       "out_again": FOLDER_READ_ALREADY, "pipe.txt": NOT_A_FILE}
    assert listing.links_followed == 1 and listing.files_through_links == 1
    closed = corpus_files(corpus, None)
    assert [p.name for p in closed.files] == ["a.txt"]
    assert dict(closed.set_aside) == {"out": LEAVES_CORPUS, "out_again": LEAVES_CORPUS, "pipe.txt": NOT_A_FILE}


def test_a_pseudonymising_domain_quarantines_a_leaving_link_by_its_pseudonym(linked_project: Path) -> None:
    write_params(linked_project, tiny_params(corpus="corpus", labels=None, ingest={"max_quarantined_fraction": 0.5},
                                             privacy={"pseudonymise": True, "salt_file": "secret/salt"}))
    run_stage("ingest", "legal", linked_project)
    quarantine = read_jsonl(linked_project / "data/legal/manifest/quarantine.jsonl")
    leaving = [q for q in quarantine if q["reason"] == LEAVES_CORPUS]
    assert len(leaving) == 2 and all(q["key"].startswith("key-") for q in leaving)
