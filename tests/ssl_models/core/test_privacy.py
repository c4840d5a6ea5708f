"""Pseudonyms: stable under one salt, different under another, kinds kept apart; names scrubbed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_models.core.errors import PipelineError
from ssl_models.core.privacy import load_salt, pseudonymiser, without_names


def test_pseudonyms_are_stable_per_salt_and_kind(tmp_path: Path) -> None:
    first = pseudonymiser(tmp_path / "salt")
    again = pseudonymiser(tmp_path / "salt")
    other = pseudonymiser(tmp_path / "other-salt")
    assert first("patient", "DOE^JOHN") == again("patient", "DOE^JOHN")
    assert first("patient", "DOE^JOHN") != other("patient", "DOE^JOHN")
    assert first("patient", "DOE^JOHN") != first("key", "DOE^JOHN")
    assert first("patient", "DOE^JOHN").startswith("patient-") and "DOE" not in first("patient", "DOE^JOHN")
    assert (tmp_path / "salt").stat().st_mode & 0o077 == 0


def test_a_missing_or_short_salt_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not found"):
        load_salt(tmp_path / "absent", create=False)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(PipelineError, match="needs at least 16"):
        load_salt(tmp_path / "short")


def test_library_messages_lose_every_form_of_the_path(tmp_path: Path) -> None:
    path = tmp_path / "DOE_JOHN_1961.nii.gz"
    message = f"Empty file: '{path}' ({path.name})"
    cleaned = without_names(message, [path])
    assert "DOE_JOHN" not in cleaned and cleaned == "Empty file: '<file>' (<file>)"
