"""Pointing `corpus` and `labels` at another folder runs the whole legal path, no code change."""

from __future__ import annotations

import csv
import html
import json
from collections import Counter
from pathlib import Path

import pytest

from ssl_models.legal_text.default_data import licensedcode_dir, split_front_matter
from tasks.io import read_json
from tests.conftest import run_stages, tiny_params, write_params

MIN_PER_CLASS = 6


def write_mixed_corpus(root: Path, n: int = 48) -> None:
    """Real license texts laid out as .txt, .md, .html and .jsonl records, labeled by category;
    label paths written the ways people write them (./, backslashes, #L<n> for JSONL)."""
    corpus = root / "firm_docs"
    (corpus / "sub").mkdir(parents=True)
    rows, records = [], []
    sources = sorted(licensedcode_dir().glob("*.LICENSE"))[::7]
    for i, source in enumerate(sources[:n]):
        header, text = split_front_matter(source.read_text(encoding="utf-8"))
        if not text.strip():
            continue
        kind = i % 4
        if kind == 0:
            (corpus / f"{source.stem}.txt").write_text(text)
            rows.append((f"./{source.stem}.txt", header["category"]))
        elif kind == 1:
            (corpus / "sub" / f"{source.stem}.md").write_text(f"# {header['name']}\n\n{text}")
            rows.append((f"sub\\{source.stem}.md", header["category"]))
        elif kind == 2:
            (corpus / f"{source.stem}.html").write_text(f"<html><body><p>{html.escape(text)}</p></body></html>")
            rows.append((f"{source.stem}.html", header["category"]))
        else:
            records.append((json.dumps({"body": text}), header["category"]))
    (corpus / "records.jsonl").write_text("\n".join(r for r, _ in records) + "\n")
    rows += [(f"records.jsonl#L{line}", category) for line, (_, category) in enumerate(records, start=1)]
    # a category of a few texts may fall wholly in the test split, which stops ingest (as it
    # should): merge the rare ones, as a practitioner would before labelling
    counts = Counter(category for _, category in rows)
    rows = [(path, category if counts[category] >= MIN_PER_CLASS else "Other") for path, category in rows]
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


@pytest.mark.slow
def test_whole_legal_path_on_a_mixed_format_folder(tiny_project: Path) -> None:
    write_mixed_corpus(tiny_project)
    write_params(tiny_project, tiny_params(corpus="firm_docs", labels="labels.csv", ingest={"text_field": "body"},
                                           finetune={"label_fractions": [1.0], "seeds": [0, 1, 2]}))
    run_stages(tiny_project, "legal", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report")
    summary = read_json((tiny_project / "data/legal/manifest/summary.json"))
    assert summary["quarantined"] == 0 and summary["labels_without_file"] == 0
    assert summary["labeled"] == summary["records"] >= 40
    metrics = read_json((tiny_project / "reports/legal/metrics.json"))
    assert {r["init"] for r in metrics["results"]} == {"ssl", "scratch", "baseline"}
    assert (tiny_project / "reports/legal/report/report.html").read_text().startswith("<!doctype html>")
