"""Ingest's first pass in the stage's process: its index of the contents kept (tasks/content_index.py),
and the rows' lines the workers render for it."""

import hashlib
import json
import random

import pytest

from ssl_models.core.config import SplitConfig
from ssl_models.core.domain import Record
from tasks.content_index import ContentIndex
from tasks.stages.ingest import _row_line, _unlabeled_line, set_group_and_split


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_finds_every_kept_content_before_and_after_merges_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(ContentIndex, "MERGE", 50)  # many merges over 1,000 rows
    index = ContentIndex(tmp_path / "index.sqlite")
    kept = {}
    for start in range(0, 1000, 64):
        rows = [(_sha(i), f"doc-{i}", i, None if i % 3 else f"patient-{i % 7}")
                for i in range(start, min(1000, start + 64))]
        index.add(rows)
        kept.update({sha: (key, line, group) for sha, key, line, group in rows})
        asked = [_sha(i) for i in random.Random(start).sample(range(2000), 100)]
        assert index.find(asked) == {sha: kept[sha] for sha in asked if sha in kept}
    assert len(index.prefixes) > 900  # most rows went through a merge into the sorted arrays
    assert index.find([]) == {}
    index.close()


def test_two_contents_sharing_their_first_eight_bytes_are_not_taken_for_one(tmp_path):
    first = "ab" * 8 + "0" * 48
    second = "ab" * 8 + "f" * 48  # the same 64-bit prefix, another content
    for merged in (False, True):  # looked up among the recent rows, then in the sorted arrays
        index = ContentIndex(tmp_path / f"index-{merged}.sqlite")
        index.add([(first, "a.txt", 0, None)])
        if merged:
            index._merge()
        assert (len(index.prefixes), len(index.recent)) == ((1, 0) if merged else (0, 1))
        assert index.find([second]) == {}
        index.add([(second, "b.txt", 1, "g")])  # its prefix among the recent rows merges them in first
        assert len(index.prefixes) == 1 and len(index.recent) == 1
        assert index.find([first, second]) == {first: ("a.txt", 0, None), second: ("b.txt", 1, "g")}
        index._merge()  # both in the sorted arrays, one prefix twice
        assert list(index.lines) == [0, 1] and not index.recent
        assert index.find([second, first]) == {first: ("a.txt", 0, None), second: ("b.txt", 1, "g")}
        index.close()


@pytest.mark.parametrize("meta, group", [
    ({"format": "txt", "characters": 12, "score": 0.5, "tags": ["a", "é"]}, None),
    ({"format": "dicom", "modality": "ct", "shape": [4, 4, 4]}, "PATIENT^DOE"),
    ({"format": "dicom", "series": "\0key\0", "note": "\0group\0"}, "PATIENT^DOE"),  # values that spell markers
    ({"format": "txt", "note": "\0group\0"}, None),
    ({"format": "txt", "key": "from-meta", "split": "ignored"}, "g"),  # meta fields named like the row's own
])
def test_a_row_rendered_in_a_worker_is_the_line_the_stage_wrote_itself(meta, group):
    """A worker renders a row's manifest line with markers for its names; the stage's process puts
    in the (pseudonymised) names: the line is the one rendering the whole row there gives."""
    record = Record("folder/DOE_JOHN.txt", "ab" * 32, 123, meta, group=group)
    split = SplitConfig(val=0.1, test=0.2, salt="s")
    public = lambda kind, value: f"{kind}-{len(value)}"  # noqa: E731 - a stand-in pseudonymiser
    _, line = _unlabeled_line(record, split)
    key, source = public("key", record.key), public("key", "folder")
    written = _row_line(line, key, source, group, record.sha256, split, public)
    expected = {"key": key, "source": source, "sha256": record.sha256, "bytes": 123, **meta}
    set_group_and_split(expected, None, group, split, public)
    assert written == json.dumps(expected, sort_keys=True, default=str)
    assert "DOE" not in written
