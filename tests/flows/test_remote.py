"""A team shares results through a DVC remote (a local folder here; an S3, GCS, Azure or SSH URL
works the same way): one clone runs the pipeline and pushes, a fresh clone elsewhere pulls, finds
every output byte-identical and up to date, and verifies its lineage; the secret pseudonym salt
reaches neither the remote nor git, and must be handed over out of band to verify a private domain."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tasks.cli import STAGES
from tasks.lineage import diff, run_record_path, verify
from tasks.paths import DomainPaths
from ssl_models.core.hashing import sha256_file
from tests.conftest import SCRIPTS, copy_project, copy_project_code, stage_env, tiny_params, write_params

PRIVATE = "notes"  # a second legal_text block that pseudonymises its file names
SALT = ".secrets/pseudonym-salt"  # privacy.salt_file's default
# every DVC and stage command runs under umask 077, the README's recipe for a private domain: the
# cache's and the remote's folders are then the owner's alone
UMASK = 0o077


class RerunAfterPull(AssertionError):
    """`dvc repro` in a fresh clone re-ran stages although every output was pulled."""


def team_params() -> dict:
    """Tiny legal params, plus a pseudonymising copy of the block on its own default corpus with a
    lighter fine-tuning grid (what is shared does not depend on the grid's size)."""
    params = tiny_params()
    block = copy.deepcopy(params["domains"]["legal"])
    block.update(corpus=f"data/{PRIVATE}/default/corpus", labels=f"data/{PRIVATE}/default/labels.csv",
                 privacy={"pseudonymise": True})
    block["finetune"].update(seeds=[0, 1], protocols=["linear", "knn"])
    params["domains"][PRIVATE] = block
    return params


def run(folder: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env=stage_env(), umask=UMASK)


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    result = run(folder, str(SCRIPTS / "dvc"), *args)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    result = run(folder, "git", "-c", "user.name=team", "-c", "user.email=team@example.org", *args)
    assert result.returncode == 0, result.stderr
    return result


def lineage_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return run(folder, str(SCRIPTS / "ssl-pipeline"), "lineage", *args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def lineage_artifacts(domain: str) -> list[Path]:
    """Every artifact folder of `domain` that holds a lineage record (export has its own manifest)."""
    paths = DomainPaths(domain)
    return [paths.default_data, paths.manifest, paths.shards, paths.pretrain, paths.finetune,
            paths.evaluation, paths.report]


def stage_outputs(root: Path) -> list[Path]:
    """Every file the stages wrote that DVC versions: run records and pretrain's resumable
    checkpoints (`cache: false`, git-ignored) stay on the machine that ran the stages."""
    return [p for base in ("data", "models", "reports") for p in sorted((root / base).rglob("*"))
            if p.is_file() and not p.name.endswith(".run.json")
            and not (base == "models" and p.relative_to(root).parts[2] == "checkpoints")]


def output_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in stage_outputs(root)}


def output_mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in stage_outputs(root)}


@pytest.mark.slow
def test_a_fresh_clone_pulls_from_the_remote_and_has_nothing_to_run(tmp_path: Path) -> None:
    origin, clone, remote = tmp_path / "origin", tmp_path / "elsewhere" / "clone", tmp_path / "remote"
    domains = ("legal", PRIVATE)
    origin.mkdir()
    write_params(origin, team_params())
    copy_project_code(origin)  # git init, dvc init, code and dvc.yaml committed

    # the team member who runs it: every stage, then everything git tracks and a push of the rest
    repro = dvc(origin, "repro")
    assert set(re.findall(r"Running stage '([^']+)'", repro.stdout)) == {f"{s}@{d}" for s in STAGES for d in domains}
    salt = (origin / SALT).read_bytes().strip()
    assert len(salt) >= 16 and mode(origin / SALT) == 0o600
    dvc(origin, "remote", "add", "-d", "shared", str(remote))
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "a tiny run of both domains")
    assert not git(origin, "status", "--porcelain").stdout.strip()  # dvc.lock, metrics, plots: all committed
    dvc(origin, "push")
    digests = output_digests(origin)
    assert {path.split("/")[1] for path in digests} == set(domains)

    # (3) the salt is in no file of the remote, and in no commit of git
    stored = [p for p in remote.rglob("*") if p.is_file()]
    assert len(stored) > 50
    assert not [p for p in stored if salt in p.read_bytes()]
    assert git(origin, "ls-files", SALT).stdout == ""
    revisions = git(origin, "rev-list", "--all").stdout.split()
    found = run(origin, "git", "grep", "-F", "-l", salt.decode(), *revisions)
    assert found.returncode == 1 and not found.stdout, found.stdout  # exit 1: no match in any revision

    # (4) nobody else can reach the remote's files: its folders are the owner's alone (umask 077).
    # DVC makes every object read-only (0444) whatever the umask: behind 0700 folders, others cannot open it.
    folders = [remote, *(p for p in remote.rglob("*") if p.is_dir())]
    assert {mode(p) for p in folders} == {0o700}, sorted({oct(mode(p)) for p in folders})
    assert {mode(p) & 0o222 for p in stored} == {0}  # read-only objects, for the owner too

    # a teammate elsewhere: git clone, dvc pull; the origin then moves away, so nothing the clone
    # reads may name its paths
    clone.parent.mkdir()
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    dvc(clone, "pull")
    assert not (clone / SALT).exists()  # the salt travels with neither git nor DVC
    assert output_digests(clone) == digests  # every output, byte-identical
    # the same lineage, though the clone has no run records (they stay where the stages ran)
    same = lineage_cli(clone, "diff", str(origin / "reports/legal/report"), "reports/legal/report")
    assert same.returncode == 0 and "the same lineage" in same.stdout, same.stdout
    origin.rename(tmp_path / "origin-moved-away")

    # (2) lineage verifies in the clone: a public domain as it is
    for artifact in lineage_artifacts("legal"):
        assert verify(clone / artifact, clone) == [], artifact
    verified = lineage_cli(clone, "verify", "reports/legal/report")
    assert verified.returncode == 0 and "verified" in verified.stdout, verified.stdout + verified.stderr
    exported = run(clone, str(SCRIPTS / "ssl-pipeline"), "export", "verify", "models/legal/export")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    # a private domain's raw file names are pseudonyms: without the salt, one line saying so
    refused = lineage_cli(clone, "verify", f"reports/{PRIVATE}/report")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: salt file {SALT} not found"), lines
    # with the salt handed over out of band (owner-only, as the pipeline keeps it), it verifies
    (clone / SALT).parent.mkdir(mode=0o700)
    descriptor = os.open(clone / SALT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(salt + b"\n")
    for artifact in lineage_artifacts(PRIVATE):
        assert verify(clone / artifact, clone) == [], artifact
    verified = lineage_cli(clone, "verify", f"reports/{PRIVATE}/report")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    exported = run(clone, str(SCRIPTS / "ssl-pipeline"), "export", "verify", f"models/{PRIVATE}/export")
    assert exported.returncode == 0, exported.stdout + exported.stderr

    # (1) DVC finds everything up to date: `dvc repro` runs no stage and touches no output
    before = output_mtimes(clone)
    status = dvc(clone, "status")
    repro = dvc(clone, "repro")
    ran = re.findall(r"Running stage '([^']+)'", repro.stdout)
    if ran:
        raise RerunAfterPull(f"dvc repro re-ran {ran} in a fresh clone after dvc pull; dvc status said:\n"
                             f"{status.stdout}")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    assert output_mtimes(clone) == before


def test_lineage_diff_of_pulled_outputs_names_no_code_difference(built_legal, tmp_path: Path) -> None:
    """A clone that pulled the outputs has no run records (they stay where the stages ran): the code
    it cannot know is not reported as differing; where both sides have them, a commit still is."""
    made = built_legal("pretrain")
    pulled = copy_project(made, tmp_path / "pulled")
    records = sorted(pulled.rglob(".*.run.json"))
    assert records
    kept = {path: path.read_text() for path in records}
    for path in records:
        path.unlink()
    assert diff(made / "models/legal/pretrain", pulled / "models/legal/pretrain") == []
    for path, text in kept.items():
        path.write_text(text)
    run = run_record_path(pulled / "models/legal/pretrain")
    record = json.loads(run.read_text())
    record["code"] = {**record["code"], "commit": "0123abc"}
    run.write_text(json.dumps(record))
    assert diff(made / "models/legal/pretrain", pulled / "models/legal/pretrain") == [
        f"pretrain@legal code commit: {json.loads(kept[run])['code']['commit']!r} -> '0123abc'"]
