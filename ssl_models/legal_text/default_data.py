"""The embedded default legal corpus: ScanCode's license texts from `licensedcode-data`.

About 2,300 real license texts (CC-BY-4.0, nexB Inc. and others); each file's YAML header
gives its `category` (Permissive, Copyleft, Proprietary Free, ...), which is the label.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser is ~10x faster

from ssl_models.core.errors import PipelineError

ATTRIBUTION = (
    "License texts from the ScanCode LicenseDB, Python package `licensedcode-data` "
    "(nexB Inc. and others), licensed CC-BY-4.0: https://scancode-licensedb.aboutcode.org/"
)


def licensedcode_dir() -> Path:
    spec = importlib.util.find_spec("licensedcode")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the default legal corpus needs the package licensedcode-data; "
                            "run `pip install licensedcode-data` or point domains.legal.corpus elsewhere")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "licenses"


def split_front_matter(raw: str) -> tuple[dict, str]:
    """A ScanCode .LICENSE file: YAML between two `---` lines, then the license text."""
    parts = raw.split("---\n", 2)
    if len(parts) < 3:
        return {}, raw
    return yaml.load(parts[1], Loader=SafeLoader) or {}, parts[2]


def write_licensedcode_corpus(out_dir: Path, max_files: int | None = None) -> dict[str, int]:
    """Write `out_dir/corpus/<key>.txt` and `out_dir/labels.csv` (path,label)."""
    corpus = out_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    written, skipped_empty = 0, 0
    rows: list[tuple[str, str]] = []
    for source in sorted(licensedcode_dir().glob("*.LICENSE")):
        header, text = split_front_matter(source.read_text(encoding="utf-8"))
        if not text.strip() or not header.get("category"):
            skipped_empty += 1
            continue
        name = f"{source.stem}.txt"
        (corpus / name).write_text(text.strip() + "\n", encoding="utf-8")
        rows.append((name, str(header["category"])))
        written += 1
        if max_files is not None and written >= max_files:
            break
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    (out_dir / "SOURCE.md").write_text(ATTRIBUTION + "\n")
    return {"written": written, "skipped_without_text_or_category": skipped_empty}
