"""One file, one label: two rows of the labels CSV that label the same file differently are
refused naming both lines (the path only where names are not hidden); rows that repeat the same
label are kept once."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from ssl_models.core.errors import PipelineError
from tasks.cli import run_stage
from tasks.io import read_jsonl
from tests.conftest import cli_error, tiny_params, write_params


def make_project(root: Path, rows: list[tuple[str, str, str]], **params: object) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"c{i}.txt").write_text(f"Contract {i}. The supplier shall deliver {i} units.\n")
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])
    write_params(root, tiny_params(corpus="corpus", labels="labels.csv", split={"val": 0.0, "test": 0.2}, **params))
    return root


BASE = [(f"c{i}.txt", "supply" if i % 2 else "service", f"case-{i}") for i in range(8)]


def test_one_file_labeled_twice_differently_is_refused_naming_both_rows(tiny_project: Path) -> None:
    make_project(tiny_project, BASE + [("./c3.txt", "service", "case-3")])  # c3 is `supply` on line 5
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", tiny_project)
    message = str(caught.value)
    assert message == (f"{tiny_project / 'labels.csv'}: lines 5 and 10 give the same file ('c3.txt') different "
                       "labels ('supply' on line 5, 'service' on line 10); keep one row per file")
    assert not (tiny_project / "data/legal/manifest").exists()  # refused before anything is written
    lines, _ = cli_error(tiny_project, "ingest", "legal")
    assert lines == [f"error: {tiny_project / 'labels.csv'}: lines 5 and 10 give the same file ('c3.txt') different "
                     "labels ('supply' on line 5, 'service' on line 10); keep one row per file"]


def test_a_pseudonymising_domain_names_the_rows_not_the_file(tiny_project: Path) -> None:
    make_project(tiny_project, BASE + [("c3.txt", "service", "case-3"), ("c4.txt", "service", "case-9")],
                 privacy={"pseudonymise": True, "salt_file": "secret/salt"})
    with pytest.raises(PipelineError, match=r"lines 5 and 10 give the same file different labels \('supply' on line "
                                            r"5, 'service' on line 10\)") as caught:
        run_stage("ingest", "legal", tiny_project)
    assert "c3" not in str(caught.value)
    make_project_rows(tiny_project, BASE + [("c4.txt", "service", "case-9")])
    with pytest.raises(PipelineError, match=r"lines 6 and 10 give the same file different groups \(lines 6 and 10\)"
                       ) as caught:
        run_stage("ingest", "legal", tiny_project)
    assert "case-" not in str(caught.value) and "c4" not in str(caught.value)  # a group may be a patient id


def make_project_rows(root: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "group"), *rows])


def test_a_row_repeated_with_the_same_label_is_kept_once_and_said(tiny_project: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    make_project(tiny_project, BASE + [("c3.txt", "supply", "case-3"), ("c3.txt", "supply", "case-3")])
    with caplog.at_level(logging.INFO, logger="ingest"):
        summary = run_stage("ingest", "legal", tiny_project)
    assert summary["labeled"] == 8
    rows = {r["key"]: r for r in read_jsonl(tiny_project / "data/legal/manifest/manifest.jsonl")}
    assert rows["c3.txt"]["label"] == "supply"
    assert "2 row(s) repeat a file listed above with the same label, kept once (line(s) 10, 11)" in caplog.text


def test_two_files_of_one_source_labeled_differently_are_refused(tiny_project: Path) -> None:
    """Slices of one DICOM series are one source: labels on two of them must agree."""
    from ssl_models.core.config import load_config
    from tasks.stages.ingest import _labels_by_source

    make_project(tiny_project, BASE)
    cfg, domain = load_config("legal", tiny_project / "params.yaml")
    member_of = {"series/s1.dcm": "series", "series/s2.dcm": "series"}
    written_as = {key: key for key in member_of}
    agreeing = {"series/s1.dcm": {"label": "tumour", "group": None, "line": 2},
                "series/s2.dcm": {"label": "tumour", "group": None, "line": 3}}
    assert _labels_by_source(agreeing, member_of, written_as, cfg, domain) == {"series": agreeing["series/s1.dcm"]}
    differing = {**agreeing, "series/s2.dcm": {"label": "normal", "group": None, "line": 3}}
    with pytest.raises(PipelineError, match=r"labels.csv: lines 2 and 3 name two files of one source "
                                            r"\('series/s1.dcm' and 'series/s2.dcm'\) with different labels "
                                            r"\('tumour' and 'normal'\); a source takes one label"):
        _labels_by_source(differing, member_of, written_as, cfg, domain)
