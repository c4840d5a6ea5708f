"""The salt and a private domain's outputs: a missing salt is not silently made anew once outputs
were pseudonymised with it; a salt others may read is made owner-only again (or refused when it
is another user's); a pseudonymising domain's outputs are its owner's alone, other domains' keep
their modes."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.privacy import load_salt, new_salt
from tasks.cli import run_stage
from tasks.io import atomic_dir, atomic_file, private_outputs, read_jsonl
from tasks.sources import make_new_salt
from tests.conftest import cli_error, tiny_params, write_params

PRIVATE = {"pseudonymise": True, "salt_file": "secret/salt"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_texts(root: Path) -> None:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"DOE_JOHN_{i}.txt").write_text(f"Note {i}: the patient was seen {i} times.\n")


@pytest.fixture
def private_project(tiny_project: Path) -> Path:
    make_texts(tiny_project)
    write_params(tiny_project, tiny_params(corpus="corpus", labels=None, privacy=PRIVATE))
    return tiny_project


def test_a_missing_salt_is_not_made_anew_once_outputs_used_it(private_project: Path) -> None:
    run_stage("ingest", "legal", private_project)
    manifest = private_project / "data/legal/manifest/manifest.jsonl"
    before = read_jsonl(manifest)
    (private_project / "secret" / "salt").unlink()
    with pytest.raises(PipelineError) as caught:
        run_stage("ingest", "legal", private_project)
    message = str(caught.value)
    assert "salt file secret/salt is missing, but data/legal/manifest was pseudonymised with it" in message
    assert "changes every pseudonym" in message and "`ssl-pipeline ingest legal --new-salt`" in message
    assert not (private_project / "secret" / "salt").exists() and read_jsonl(manifest) == before
    with pytest.raises(PipelineError, match="not found: pseudonyms cannot be recomputed without it; put it back"):
        run_stage("preprocess", "legal", private_project)  # never a new salt there either
    lines, _ = cli_error(private_project, "ingest", "legal")  # exit 2, one line, no traceback
    assert len(lines) == 1 and lines[0].startswith("error: salt file secret/salt is missing")
    # the explicit way: a new salt, then new pseudonyms for every key
    said = make_new_salt(*load_config("legal", private_project / "params.yaml"))
    assert "made a new salt in secret/salt" in said and "data/legal/manifest" in said
    run_stage("ingest", "legal", private_project)
    after = read_jsonl(manifest)
    assert len(after) == len(before) and not {r["key"] for r in after} & {r["key"] for r in before}
    with pytest.raises(PipelineError, match="exists; a new salt is made only where none is"):
        make_new_salt(*load_config("legal", private_project / "params.yaml"))


def test_a_first_run_makes_its_salt_without_asking(private_project: Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")  # a manifest salted with another file does not hold this one back
    shutil.copytree(private_project, other, dirs_exist_ok=True)
    write_params(other, tiny_params(corpus="corpus", labels=None, privacy={**PRIVATE, "salt_file": "secret/other"}))
    run_stage("ingest", "legal", other)
    shutil.rmtree(other / "secret")
    write_params(other, tiny_params(corpus="corpus", labels=None, privacy=PRIVATE))
    run_stage("ingest", "legal", other)  # secret/salt was never used: made on first use
    assert mode(other / "secret" / "salt") == 0o600


def test_a_salt_others_may_read_is_made_owner_only_with_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    salt = tmp_path / "salt"
    first = load_salt(salt)
    os.chmod(salt, 0o644)
    with caplog.at_level(logging.WARNING, logger="privacy"):
        assert load_salt(salt) == first
    assert mode(salt) == 0o600
    assert "was readable or writable by others (mode 0644): made owner-only (0600)" in caplog.text
    caplog.clear()
    load_salt(salt)
    assert caplog.text == ""  # said once, when it was fixed


def test_a_shared_salt_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    salt = tmp_path / "salt"
    load_salt(salt)
    os.chmod(salt, 0o640)
    owner = salt.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # as another user who can read it sees it
    refused = r"belongs to another user \(uid \d+\) and others may read it \(mode 0640\)"
    with pytest.raises(PipelineError, match=refused):
        load_salt(salt)
    assert mode(salt) == 0o640  # not ours to change
    with pytest.raises(PipelineError, match="exists"):
        new_salt(salt)


def test_a_pseudonymising_domain_writes_owner_only_outputs_and_others_keep_their_modes(
        private_project: Path, caplog: pytest.LogCaptureFixture) -> None:
    mask = os.umask(0o022)
    try:
        (private_project / ".dvc" / "cache").mkdir(parents=True)  # as `dvc init` leaves it: 0755
        with caplog.at_level(logging.WARNING, logger="ingest"):
            run_stage("ingest", "legal", private_project)
        manifest = private_project / "data/legal/manifest"
        assert mode(manifest) == 0o700 and mode(manifest.parent) == 0o700
        assert {mode(p) for p in manifest.iterdir()} == {0o600}
        assert "DVC's cache" in caplog.text and "chmod 700" in caplog.text
        assert os.umask(0o022) == 0o022  # put back after the stage
        os.chmod(private_project / ".dvc" / "cache", 0o700)
        caplog.clear()
        write_params(private_project, tiny_params(corpus="corpus", labels=None))  # an ordinary domain
        run_stage("ingest", "legal", private_project)
        assert {mode(p) for p in manifest.iterdir()} == {0o644} and mode(manifest) == 0o755
        assert "DVC's cache" not in caplog.text
    finally:
        os.umask(mask)


def test_the_stages_after_ingest_of_a_pseudonymising_domain_write_owner_only_outputs_too(private_project: Path) -> None:
    """Not ingest alone: the CLI runs every stage of such a domain under `private_outputs` (preprocess
    shown here: its shards, files and folders)."""
    mask = os.umask(0o022)
    try:
        for stage in ("ingest", "preprocess"):
            run_stage(stage, "legal", private_project)
        shards = private_project / "data/legal/shards"
        found = [shards, *shards.rglob("*")]
        assert {mode(p) for p in found if p.is_dir()} == {0o700}
        assert {mode(p) for p in found if p.is_file()} == {0o600}
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(mask)


def test_private_outputs_take_others_bits_off_what_the_atomic_helpers_put_in_place(tmp_path: Path) -> None:
    source = tmp_path / "raw.txt"
    source.write_text("raw")
    os.chmod(source, 0o644)
    with private_outputs():
        with atomic_dir(tmp_path / "out" / "shards") as out:
            (out / "nested").mkdir(mode=0o755)
            shutil.copy(source, out / "nested" / "copied.txt")  # copies the source's 0644
            os.chmod(out / "nested", 0o755)
        with atomic_file(tmp_path / "out" / "model.bin") as tmp:
            shutil.copy(source, tmp)
            os.chmod(tmp, 0o444)  # a read-only file stays read-only, for its owner
        child = os.umask(0o022)
        os.umask(child)
        assert child & 0o077 == 0o077  # what processes started here (loader workers, ranks) inherit
    assert mode(tmp_path / "out" / "shards") == mode(tmp_path / "out" / "shards" / "nested") == 0o700
    assert mode(tmp_path / "out" / "shards" / "nested" / "copied.txt") == 0o600
    assert mode(tmp_path / "out" / "model.bin") == 0o400
    with private_outputs(False), atomic_file(tmp_path / "plain.txt") as tmp:
        shutil.copy(source, tmp)
    assert mode(tmp_path / "plain.txt") == 0o644


def test_dvc_run_under_umask_077_keeps_its_cache_behind_owner_only_folders(tmp_path: Path) -> None:
    """The README's recipe for DVC's cache (its files are always 0444; its folders follow the umask
    of the `dvc` command, or 2775 with `cache.shared: group`): under umask 077 nobody else can reach them."""
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "DOE_JOHN.txt").write_text("private")
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run(["sh", "-c", f"umask 077 && {dvc} init --no-scm -q && {dvc} add data -q"], cwd=tmp_path,
                   check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    cache = tmp_path / ".dvc" / "cache"
    folders = [cache, *(p for p in cache.rglob("*") if p.is_dir())]
    assert len(folders) > 2 and {mode(p) for p in folders} == {0o700}
    assert {mode(p) for p in cache.rglob("*") if p.is_file()} == {0o444}  # readable only through those folders
