from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ssl_models.core.errors import PipelineError
from tasks.cli import run_stage
from tasks.io import read_json, read_jsonl
from ssl_models.core.hashing import sha256_file
from tasks.lineage import check_raw_inputs_unchanged, raw_inputs
from tests.conftest import peaks_in_a_fresh_interpreter, tiny_params, write_params


def make_corpus(root: Path) -> None:
    corpus = root / "corpus"
    (corpus / "contracts").mkdir(parents=True)
    for i in range(24):
        (corpus / "contracts" / f"c{i}.txt").write_text(f"Contract {i}. The supplier shall deliver {i} units.\n")
    (corpus / "contracts" / "copy_of_c0.txt").write_text("Contract 0. The supplier shall deliver 0 units.\n")
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "scan.txt").write_bytes(b"\x00\x01\x02binary\x00")
    (corpus / "photo.png").write_bytes(b"\x89PNG")
    (corpus / ".DS_Store").write_bytes(b"junk")
    (corpus / "records.jsonl").write_text(json.dumps({"text": "A clause in a record."}) + "\n{broken\n")
    with open(corpus / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for i in range(24):
            writer.writerow([f"contracts/c{i}.txt", "supply" if i % 2 else "service", f"case-{i // 4}"])
        writer.writerow(["empty.txt", "service", ""])


@pytest.fixture
def corpus_project(tiny_project: Path) -> Path:
    make_corpus(tiny_project)
    write_params(tiny_project, tiny_params(corpus="corpus", labels="corpus/labels.csv", split={"test": 0.3, "val": 0.1}))
    return tiny_project


def test_manifest_quarantine_and_duplicates(corpus_project: Path) -> None:
    summary = run_stage("ingest", "legal", corpus_project)
    manifest = read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl"))
    quarantine = {q["key"]: q["reason"] for q in read_jsonl((corpus_project / "data/legal/manifest/quarantine.jsonl"))}
    keys = {row["key"] for row in manifest}
    assert "contracts/c3.txt" in keys and "records.jsonl#L1" in keys
    assert "contracts/copy_of_c0.txt" not in keys and summary["duplicates_dropped"] == 1
    assert quarantine["empty.txt"] == "empty file"
    assert "binary" in quarantine["scan.txt"]
    assert "unsupported file type" in quarantine["photo.png"]
    assert "invalid JSON" in quarantine["records.jsonl#L2"]
    assert summary["hidden_files_skipped"] == 1
    assert "labels.csv" not in quarantine  # the labels file inside the corpus is not a document
    assert summary["labels_without_file"] == 0 and summary["labels_on_quarantined_files"] == 1
    assert "stopped" not in summary
    row = next(r for r in manifest if r["key"] == "contracts/c5.txt")
    assert row["label"] == "supply" and row["group"] == "case-1" and len(row["sha256"]) == 64
    assert row["characters"] == len("Contract 5. The supplier shall deliver 5 units.\n")


def test_groups_never_straddle_splits_and_splits_are_stable(corpus_project: Path) -> None:
    run_stage("ingest", "legal", corpus_project)
    first = {r["key"]: r["split"] for r in read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl"))}
    by_group: dict[str, set[str]] = {}
    for row in read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl")):
        if row["group"]:
            by_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_group.values())
    assert len({s for splits in by_group.values() for s in splits}) > 1  # groups do land in several splits
    (corpus_project / "corpus" / "new.txt").write_text("A new judgment arrives later.")
    run_stage("ingest", "legal", corpus_project)
    second = {r["key"]: r["split"] for r in read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl"))}
    assert {k: second[k] for k in first} == first  # adding a file moves no old one


def test_lineage_records_raw_file_hashes(corpus_project: Path) -> None:
    run_stage("ingest", "legal", corpus_project)
    record = read_json((corpus_project / "data/legal/manifest/lineage.json"))
    assert record["artifact"] == "data/legal/manifest"
    listed = dict(raw_inputs(record, corpus_project))
    corpus = corpus_project / "corpus"
    # every non-hidden file, read or quarantined, with its own sha256 (the labels CSV inside is not a raw file)
    expected = {path.relative_to(corpus).as_posix(): sha256_file(path) for path in corpus.rglob("*")
                if path.is_file() and not path.name.startswith(".") and path.name != "labels.csv"}
    assert listed == expected and record["raw_inputs_count"] == len(expected)
    assert record["raw_inputs_digest"] == sha256_file(corpus_project / "data/legal/manifest" / record["raw_inputs_file"])
    assert record["params"]["corpus"] == "corpus"
    # a record written before the digests moved to their own file still reads
    legacy = {k: v for k, v in record.items() if not k.startswith("raw_inputs")} | {"raw_inputs": expected}
    assert dict(raw_inputs(legacy, corpus_project)) == expected
    (corpus_project / "data/legal/manifest/lineage.json").write_text(json.dumps(legacy))
    check_raw_inputs_unchanged(corpus_project / "data/legal/manifest", corpus_project, "ingest@legal")
    (corpus / "empty.txt").write_text("now with words in it")
    with pytest.raises(PipelineError, match="raw file corpus/empty.txt: content changed"):
        check_raw_inputs_unchanged(corpus_project / "data/legal/manifest", corpus_project, "ingest@legal")


def test_bad_labels_csv_is_a_clear_error(corpus_project: Path) -> None:
    (corpus_project / "corpus" / "labels.csv").write_text("file,category\na.txt,x\n")
    with pytest.raises(PipelineError, match="needs columns path,label"):
        run_stage("ingest", "legal", corpus_project)


def test_pseudonymised_ingest_writes_no_file_name_and_still_joins_labels(corpus_project: Path) -> None:
    """With `privacy.pseudonymise`, keys, groups and raw-file names leave ingest as salted hashes;
    labels still reach their files, preprocess still finds them, and verify still re-hashes them."""
    from tasks.lineage import verify

    write_params(corpus_project, tiny_params(corpus="corpus", labels="corpus/labels.csv",
                                             split={"test": 0.3, "val": 0.1},
                                             privacy={"pseudonymise": True, "salt_file": "secret/salt"}))
    summary = run_stage("ingest", "legal", corpus_project)
    assert summary["pseudonymised"] and summary["labeled"] == 24
    assert (corpus_project / "secret" / "salt").stat().st_mode & 0o077 == 0  # readable by the owner only
    written = "".join(p.read_text() for p in (corpus_project / "data/legal/manifest").iterdir())
    for name in ("c5.txt", "contracts", "empty.txt", "photo.png", "records.jsonl", "case-1"):  # hex holds "c5"
        assert name not in written
    manifest = read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl"))
    assert all(row["key"].startswith("key-") and row["source"].startswith("key-") for row in manifest)
    assert {row["group"] for row in manifest if row["label"]} <= {r["group"] for r in manifest}
    assert len({row["group"] for row in manifest if row["label"]}) == 6  # six cases, six pseudonyms
    run_stage("preprocess", "legal", corpus_project)
    assert verify(corpus_project / "data/legal/shards", corpus_project) == []
    (corpus_project / "corpus" / "contracts" / "c5.txt").write_text("edited")
    problems = verify(corpus_project / "data/legal/shards", corpus_project)
    assert len(problems) == 1 and "content changed" in problems[0] and "c5.txt" not in problems[0]
    # a second run on the same machine gives the same pseudonyms (the salt file is reused)
    (corpus_project / "corpus" / "contracts" / "c5.txt").write_text("Contract 5. The supplier shall deliver 5 units.\n")
    run_stage("ingest", "legal", corpus_project)
    assert read_jsonl((corpus_project / "data/legal/manifest/manifest.jsonl")) == manifest


def write_labels(path: Path, rows: list[tuple[str, ...]], encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows([("path", "label", "group")[:len(rows[0])], *rows])


def test_labels_naming_missing_files_stop_ingest_with_examples_and_the_likely_cause(corpus_project: Path) -> None:
    """The new user's case: paths relative to the folder above the corpus (`corpus/contracts/c0.txt`)."""
    labels = corpus_project / "corpus" / "labels.csv"
    write_labels(labels, [(f"corpus/contracts/c{i}.txt", "supply" if i % 2 else "service") for i in range(24)])
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", corpus_project)
    message = str(caught.value)
    assert "24 of 24 labels name no file in the corpus folder corpus" in message
    assert "'corpus/contracts/c0.txt', 'corpus/contracts/c1.txt', 'corpus/contracts/c2.txt', ..." in message
    assert "24 of them match a corpus file without `corpus/`" in message and "\n" not in message
    write_labels(labels, [(f"c{i}.txt", "supply" if i % 2 else "service") for i in range(24)])  # the other way
    with pytest.raises(PipelineError, match="24 of them match a corpus file under `contracts/`: their paths look "
                                            "relative to a folder inside the corpus"):
        run_stage("ingest", "legal", corpus_project)
    # three of 24 missing used to finish the whole run without a word
    write_labels(labels, [(f"contracts/c{i}.txt", "supply" if i % 2 else "service") for i in range(21)]
                 + [("contracts/gone1.txt", "supply"), ("contracts/gone2.txt", "service"), ("gone3.txt", "supply")])
    with pytest.raises(PipelineError, match=r"3 of 24 labels name no file .*'contracts/gone1.txt'"):
        run_stage("ingest", "legal", corpus_project)
    summary = read_json(corpus_project / "data/legal/manifest/summary.json")
    assert summary["labels_without_file"] == 3 and "3 of 24" in summary["stopped"]
    with pytest.raises(PipelineError, match="ingest@legal stopped on a problem to fix first: corpus/labels.csv: 3 "):
        run_stage("preprocess", "legal", corpus_project)  # never on the manifest of a stopped ingest


def test_missing_labels_are_shown_by_csv_line_when_pseudonymising(corpus_project: Path) -> None:
    write_labels(corpus_project / "corpus" / "labels.csv",
                 [(f"contracts/c{i}.txt", "supply" if i % 2 else "service") for i in range(20)]
                 + [("DOE_JOHN/scan.txt", "supply"), ("contracts/SMITH.txt", "service")])
    write_params(corpus_project, tiny_params(corpus="corpus", labels="corpus/labels.csv",
                                             privacy={"pseudonymise": True, "salt_file": "secret/salt"}))
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", corpus_project)
    message = str(caught.value)
    assert "2 of 22 labels name no file" in message and "(lines 22, 23)" in message
    assert "DOE" not in message and "SMITH" not in message
    assert "DOE" not in (corpus_project / "data/legal/manifest/summary.json").read_text()


def test_a_class_without_a_training_example_stops_ingest(corpus_project: Path) -> None:
    rows = [(f"contracts/c{i}.txt", "supply" if i % 2 else "service", f"case-{i // 4}") for i in range(24)]
    summary = run_stage("ingest", "legal", corpus_project)
    manifest = read_jsonl(corpus_project / "data/legal/manifest/manifest.jsonl")
    split_of = {r["key"]: r["split"] for r in manifest}
    test_only = next(k for k, s in split_of.items() if s == "test" and k.startswith("contracts/c"))
    assert summary["labeled_by_split"]["train"] > 0
    rows = [(path, "rare" if path == test_only else label, group) for path, label, group in rows]
    rows.append(("empty.txt", "lost", ""))  # its only file is quarantined
    write_labels(corpus_project / "corpus" / "labels.csv", rows)
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", corpus_project)
    message = str(caught.value)
    assert "2 class(es) have no labeled example in the train split" in message
    assert "'lost' (none readable" in message and "'rare' (1 in test)" in message


def test_a_quarantined_share_above_the_limit_stops_ingest(corpus_project: Path) -> None:
    corpus = corpus_project / "corpus"
    for i in range(10):
        (corpus / f"blank{i}.txt").write_bytes(b" \n")
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", corpus_project)
    message = str(caught.value)
    assert "14 of 39 files or records quarantined (36%, above ingest.max_quarantined_fraction 25%" in message
    assert "'empty file' x11" in message and "data/legal/manifest/quarantine.jsonl" in message
    assert len(read_jsonl(corpus_project / "data/legal/manifest/quarantine.jsonl")) == 14  # still there to read
    write_params(corpus_project, tiny_params(corpus="corpus", labels="corpus/labels.csv",
                                             ingest={"max_quarantined_fraction": 0.5}))
    assert run_stage("ingest", "legal", corpus_project)["quarantined"] == 14


def test_a_corpus_of_which_every_file_is_quarantined_stops_ingest(tiny_project: Path) -> None:
    corpus = tiny_project / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"")
    (corpus / "b.txt").write_bytes(b"\x00\x01")
    write_params(tiny_project, tiny_params(corpus="corpus", labels=None, ingest={"max_quarantined_fraction": 1.0}))
    with pytest.raises(PipelineError, match="every one of the 2 files or records was quarantined"):
        run_stage("ingest", "legal", tiny_project)
    (corpus / "a.txt").unlink()
    (corpus / "b.txt").unlink()
    with pytest.raises(PipelineError, match="holds no file to read"):
        run_stage("ingest", "legal", tiny_project)


def test_a_labels_csv_that_is_not_utf8_is_one_line_at_the_cli(corpus_project: Path) -> None:
    from tests.conftest import cli_error

    write_labels(corpus_project / "corpus" / "labels.csv", [("contracts/c1.txt", "Vertrag über Lieferung")],
                 encoding="cp1252")
    lines, _ = cli_error(corpus_project, "ingest", "legal")
    assert len(lines) == 1 and "not UTF-8 text (byte 0xfc" in lines[0] and "save the labels CSV as UTF-8" in lines[0]
    (corpus_project / "corpus" / "labels.csv").write_text("name;class\ncontracts/c1.txt;a\n")
    lines, _ = cli_error(corpus_project, "ingest", "legal")
    assert len(lines) == 1 and "needs columns path,label" in lines[0]
    (corpus_project / "corpus" / "labels.csv").write_text("path,label\ncontracts/c1.txt,\n")
    lines, _ = cli_error(corpus_project, "ingest", "legal")
    assert len(lines) == 1 and "corpus/labels.csv: no row with both a path and a label" in lines[0]
    assert "leave its header line alone" in lines[0]


def test_a_labels_csv_of_its_header_alone_ingests_without_labels_also_under_dvc(corpus_project: Path) -> None:
    """`labels: null` cannot be a DVC dependency (DVC fails on `${item.labels}`); the header alone can."""
    import subprocess

    from tests.conftest import SCRIPTS, copy_project_code, stage_env

    (corpus_project / "corpus" / "labels.csv").write_text("path,label\n")
    copy_project_code(corpus_project)  # git and DVC initialised
    done = subprocess.run([str(SCRIPTS / "dvc"), "repro", "-s", "ingest@legal"], cwd=corpus_project, env=stage_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((corpus_project / "data/legal/manifest/summary.json").read_text())
    assert summary["labeled"] == 0 and summary["records"] > 0
    assert all(row["label"] is None for row in read_jsonl(corpus_project / "data/legal/manifest/manifest.jsonl"))


def test_preprocess_before_ingest_is_one_line(tiny_project: Path) -> None:
    from tests.conftest import cli_error

    lines, _ = cli_error(tiny_project, "preprocess", "legal")
    assert len(lines) == 1 and "data/legal/manifest" in lines[0] and "run ingest@legal first" in lines[0]


def _short_texts(corpus: Path, files: int) -> Path:
    """`files` one-line texts, 500 a folder."""
    for i in range(files):
        folder = corpus / f"{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc-{i:05d}.txt").write_text(f"Document {i}. The lessee shall pay the rent of {i} on time.\n")
    return corpus


def _peak_traced_ingest(root: Path, files: int) -> int:
    """Peak Python memory (tracemalloc) of an in-process ingest of `files` short texts, one worker."""
    corpus = _short_texts(root / "corpus", files)
    (corpus / "000" / "doc-00001.txt").write_text("Document 0. The lessee shall pay the rent of 0 on time.\n")
    labels = root / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"000/doc-{i:05d}.txt,{'ab'[i % 2]}\n" for i in range(2, 42)))
    write_params(root, tiny_params(corpus="corpus", labels="labels.csv", split={"test": 0.2, "val": 0.1},
                                   ingest={"workers": 1, "chunk_size": 64}))
    peak, summary = _traced_stage(root, "ingest")
    assert summary["records"] == files - 1 and summary["duplicates_dropped"] == 1 and summary["labeled"] == 40
    return peak


def _traced_stage(root: Path, stage: str) -> tuple[int, dict]:
    """(peak Python memory (tracemalloc), summary) of an in-process legal `stage`."""
    import tracemalloc

    tracemalloc.start()
    try:
        summary = run_stage(stage, "legal", root)
        return tracemalloc.get_traced_memory()[1], summary
    finally:
        tracemalloc.stop()


def test_ingest_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    """Nothing per file is held but 16 bytes of the index of contents (tasks/content_index.py): the
    listing is walked as a stream, rows, quarantine entries and raw digests go to scratch files. Twelve times the files, nearly the same
    peak (the stream read ahead to size the chunks is made short here, as a corpus far longer than
    it would make it negligible, and so is the hash cache's write buffer). What is left is noise:
    pathlib interns every file name, and a resize of the interpreter's table of interned strings
    can land in either run (here up to about 300 bytes a file); the code before held 1.3-2.7 KB a
    file. Measured in a fresh interpreter: in a test process that has run many tests before, that
    table is large and one resize of it alone took 16 MB (1.5 KB a file of the larger run)."""
    small, large = peaks_in_a_fresh_interpreter(
        tmp_path, "tests.tasks.test_ingest:_peak_traced_ingest", (300, 1000, 12000),
        "import ssl_models.core.workers, ssl_models.core.hashing\n"
        "ssl_models.core.workers.LOOKAHEAD = 256\nssl_models.core.hashing.HashCache.FLUSH_EVERY = 256")
    per_file = (large - small) / 11000
    assert per_file < 500, f"{per_file:.0f} bytes more per file ({small} -> {large} bytes at peak)"


def _peak_traced_preprocess(root: Path, files: int) -> int:
    """Peak Python memory (tracemalloc) of an in-process legal preprocess of `files` short texts
    (ingested first, untraced)."""
    _short_texts(root / "corpus", files)
    write_params(root, tiny_params(corpus="corpus", labels=None, split={"test": 0.2, "val": 0.1},
                                   ingest={"workers": 1}))
    run_stage("ingest", "legal", root)
    peak, summary = _traced_stage(root, "preprocess")
    assert summary["pretrain_train_blocks"] > 0
    return peak


def test_preprocess_memory_holds_no_row_and_no_source(tmp_path: Path) -> None:
    """Preprocess reads the manifest a row at a time (JsonlRows: an offset a row), finds each row's
    source by walking the corpus alongside it (one source held), and legal keeps its texts in a
    scratch file (two integers a row); the copy checks keep the labeled test rows' hashes only, and
    the token blocks go to the shards as each tokenizer batch fills them (`ShardWriter`). What still
    grows is a few integers a row (the row numbers by split, the texts' and the rows' offsets): 58
    bytes a text here. Held before: every row (0.75 KB), every source (0.6 KB), a key-to-offset map
    and an array a text, 1.8 KB a text; then, with those gone, the blocks until the end, 0.44 KB. In
    a fresh interpreter, as the ingest test, with the tokenizer's batches made short (they are
    bounded, not per row: 2 MiB of text each) and the writer's buffer with them."""
    small, large = peaks_in_a_fresh_interpreter(
        tmp_path, "tests.tasks.test_ingest:_peak_traced_preprocess", (300, 1000, 9000),
        "import ssl_models.legal_text.shards\n"
        "ssl_models.legal_text.shards.BATCH_CHARACTERS = 4096  # a batch of 2 MiB of text is ~35,000 of these texts\n"
        "from ssl_models.core.shards import ShardWriter\n"
        "ShardWriter.FLUSH_BYTES = 64 * 1024")
    per_text = (large - small) / 8000
    assert per_text < 200, f"{per_text:.0f} bytes more per text ({small} -> {large} bytes at peak)"


def test_a_label_on_a_dropped_copy_lands_on_the_row_kept_and_the_counts_follow(tiny_project: Path) -> None:
    """Ingest writes each row as it comes and rewrites, in its second pass, only the rows a label
    lands on: one labeled through its dropped copy, one whose copy carries another label (the first
    label in the CSV stays), one labeled directly with a group; every count agrees with the rows."""
    corpus = tiny_project / "corpus"
    corpus.mkdir()
    texts = {f"t{i}.txt": f"Clause {i}. The tenant shall repair the roof within {i} days.\n" for i in range(30)}
    texts |= {"zz_copy_of_t0.txt": texts["t0.txt"], "zz_copy_of_t1.txt": texts["t1.txt"]}
    for name, text in texts.items():
        (corpus / name).write_text(text)
    (corpus / "labels.csv").write_text("path,label,group\nzz_copy_of_t0.txt,lease,\nt1.txt,sale,g1\n"
                                       "zz_copy_of_t1.txt,lease,\nt2.txt,sale,g2\n")
    write_params(tiny_project, tiny_params(corpus="corpus", labels="corpus/labels.csv"))
    summary = run_stage("ingest", "legal", tiny_project)
    rows = {row["key"]: row for row in read_jsonl(tiny_project / "data/legal/manifest/manifest.jsonl")}
    assert set(rows) == {f"t{i}.txt" for i in range(30)}
    assert (rows["t0.txt"]["label"], rows["t1.txt"]["label"], rows["t2.txt"]["label"]) == ("lease", "sale", "sale")
    assert (rows["t1.txt"]["group"], rows["t2.txt"]["group"]) == ("g1", "g2")
    assert all(row["label"] is None for key, row in rows.items() if key not in {"t0.txt", "t1.txt", "t2.txt"})
    assert summary["labeled"] == 3 and summary["labels_conflicting_on_duplicates"] == 1
    splits = [row["split"] for row in rows.values()]
    assert summary["records_by_split"] == {s: splits.count(s) for s in ("train", "val", "test")}
    labeled = [rows[key]["split"] for key in ("t0.txt", "t1.txt", "t2.txt")]
    assert summary["labeled_by_split"] == {s: labeled.count(s) for s in ("train", "val", "test")}
