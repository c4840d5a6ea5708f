"""`ssl-pipeline embed`: any folder through the domain's readers, quarantine, pseudonyms and
preprocessing into the embeddings the pipeline itself gives those records; bad files quarantined
with their reason, bad input one line, and nothing private written where the domain pseudonymises."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_from_disk

from ssl_models.core.config import load_config
from ssl_models.core.privacy import Pseudonymiser
from ssl_models.core.shards import LABELED
from tasks.cli import main
from tasks.embed import embed, quarantine_path, read_embeddings
from tasks.export import export as export_folder
from tasks.paths import DomainPaths
from tasks.probes import embed_rows
from tasks.sources import public_namer
from tests.conftest import write_params


def pipeline_embeddings(root: Path, domain_name: str, sample_ids: list[str]) -> dict[str, np.ndarray]:
    """What the fine-tune stage embeds for these rows of the `labeled` shard: sample_id -> embedding."""
    cfg, domain = load_config(domain_name, root / "params.yaml")
    paths = DomainPaths(domain_name, root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0)
    rows = [r for r in load_from_disk(str(paths.shards / LABELED)).to_list() if r["sample_id"] in sample_ids]
    assert {r["sample_id"] for r in rows} == set(sample_ids)
    return dict(zip([r["sample_id"] for r in rows], embed_rows(encoder, rows, precision=cfg.finetune.precision)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_folder_of_good_and_bad_files_embeds_the_good_as_the_pipeline_does(
        pretrained_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = pretrained_project
    corpus = sorted((root / "data/legal/default/corpus").glob("*.txt"))[:6]
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    good = {"a.txt": corpus[0], "sub/b.txt": corpus[1], "c.md": corpus[2], "d.txt": corpus[3],
            "e.txt": corpus[4], "sub/f.txt": corpus[5], "copy-of-a.txt": corpus[0]}  # a copy: both keys written
    for name, source in good.items():
        shutil.copy(source, folder / name)
    (folder / "sub/records.jsonl").write_text(json.dumps({"text": "Permission is hereby granted, free of charge"})
                                              + "\n{not json\n" + json.dumps({"text": "GNU GPL copyleft"}) + "\n")
    (folder / "corrupt.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00zip")
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4")
    (folder / "empty.txt").write_bytes(b"")
    out = tmp_path / "out" / "embeddings.parquet"

    # batch size 2, 4 batches a chunk: chunks of 8 sources, so the folder is read, preprocessed and
    # written in two chunks
    monkeypatch.setattr("tasks.embed.CHUNK_BATCHES", 4)
    summary = embed(root, "legal", folder, out, batch_size=2)

    quarantined = {q["key"]: q["reason"] for q in map(json.loads, quarantine_path(out).read_text().splitlines())}
    assert quarantined == {"corrupt.txt": "binary content (NUL bytes), not text",
                           "scan.pdf": "unsupported file type; legal_text reads .txt, .md, .html, .htm, .jsonl",
                           "empty.txt": "empty file",
                           "sub/records.jsonl#L2": quarantined["sub/records.jsonl#L2"]}
    assert quarantined["sub/records.jsonl#L2"].startswith("invalid JSON")
    keys, vectors = read_embeddings(out)
    assert sorted(keys) == sorted([*good, "sub/records.jsonl#L1", "sub/records.jsonl#L3"])
    assert summary == {"embedded": 9, "quarantined": 4, "out": str(out), "quarantine": str(quarantine_path(out)),
                       "dim": 32}
    schema = pq.read_schema(out)
    assert schema.field("key").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)  # fixed size
    assert pq.ParquetFile(out).num_row_groups == 2  # streamed, a row group per chunk
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    # the pipeline's own embeddings of the same records: the labeled shard's rows, as finetune embeds them
    ours = dict(zip(keys, vectors))
    theirs = pipeline_embeddings(root, "legal", sorted({sha256(source) for source in good.values()}))
    gap = max(np.abs(ours[name] - theirs[sha256(source)]).max() for name, source in good.items())
    assert gap < 1e-5, gap
    cfg, domain = load_config("legal", root / "params.yaml")
    paths = DomainPaths("legal", root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0)
    records = embed_rows(encoder, [{"text": "Permission is hereby granted, free of charge"}, {"text": "GNU GPL copyleft"}])
    assert np.abs(np.stack([ours["sub/records.jsonl#L1"], ours["sub/records.jsonl#L3"]]) - records).max() < 1e-5

    # on a GPU the next chunk is prepared in a thread while this one is embedded: the same file
    monkeypatch.setattr("tasks.embed.reads_ahead", lambda device: True)
    assert embed(root, "legal", folder, tmp_path / "ahead.parquet", batch_size=2)["embedded"] == 9
    assert pq.read_table(tmp_path / "ahead.parquet").equals(pq.read_table(out))


def test_a_file_that_breaks_preprocessing_costs_only_itself(pretrained_project: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that reads well but fails deep in the domain's preprocessing (a library error) is
    quarantined with that error, its file name taken out; the rest of its chunk is embedded."""
    from ssl_models.legal_text import LegalText

    folder = tmp_path / "incoming"
    folder.mkdir()
    for name, source in zip("abc", sorted((pretrained_project / "data/legal/default/corpus").glob("*.txt"))):
        shutil.copy(source, folder / f"{name}.txt")
    preprocess = LegalText.preprocess

    def fails_on_b(self, cfg, manifest, out_dir, locate):
        for row in manifest:
            if row["key"] == "b.txt":
                raise ValueError(f"a tokenizer error on {locate(row).paths[0]}")
        return preprocess(self, cfg, manifest, out_dir, locate)

    monkeypatch.setattr(LegalText, "preprocess", fails_on_b)
    out = tmp_path / "e.parquet"
    assert embed(pretrained_project, "legal", folder, out)["embedded"] == 2
    assert sorted(read_embeddings(out)[0]) == ["a.txt", "c.txt"]
    assert [json.loads(line) for line in quarantine_path(out).read_text().splitlines()] == [
        {"key": "b.txt", "reason": "preprocessing failed: ValueError: a tokenizer error on <file>"}]


def test_bad_input_is_one_line_and_exit_2(pretrained_project: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = pretrained_project

    def fails(folder: Path, *extra: str) -> str:
        code = main(["--root", str(root), "embed", "legal", str(folder), "--out", str(tmp_path / "e.parquet"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "is not a folder (or does not exist)" in fails(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/.hidden.txt").write_text("a hidden file is skipped, as ingest skips it")
    assert "holds no file to read (1 hidden file(s) skipped)" in fails(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"")
    (bad / "b.exe").write_bytes(b"MZ")
    err = fails(bad)
    assert "no readable file" in err and "'empty file' x1" in err and "e.quarantine.jsonl" in err
    assert len((tmp_path / "e.quarantine.jsonl").read_text().splitlines()) == 2  # the reasons can be read
    assert not (tmp_path / "e.parquet").exists()
    assert "--init 'scratch': one of ssl, generic" in fails(bad, "--init", "scratch")
    assert "has no generic checkpoint" in fails(bad, "--init", "generic")
    shutil.rmtree(root / "models/legal/pretrain")
    assert "run `ssl-pipeline pretrain legal`" in fails(bad)


@pytest.mark.slow  # the medical reference run: built here when no kill or export test of the worker has
def test_a_medical_folder_writes_no_file_or_patient_name(reference_run, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Medical data is pseudonymised: the Parquet file, the quarantine list and the logs carry
    pseudonyms and reasons, never a file, folder or patient name; the embeddings are the pipeline's."""
    from tests.ssl_models.medical_files import write_series

    run = reference_run("medical")  # read-only: embed writes only its output, in tmp_path
    root = run.root
    planted = ["Doe_Planted", "PID-4711", "Planted", "Roe_Richard"]
    folder = tmp_path / "Doe_Planted_PID-4711"  # the folder's own name is private too
    write_series(folder / "Doe_Planted_series", "Doe^Planted", "PID-4711", n_slices=10, file_stem="Doe_Planted")
    volumes = sorted((root / "data/medical/default/corpus").rglob("*.nii.gz"))[:2]
    for i, volume in enumerate(volumes):
        shutil.copy(volume, folder / f"Planted_case_{i}.nii.gz")
    (folder / "Roe_Richard.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (folder / "Roe_Richard_notes.docx").write_bytes(b"PK")
    out = tmp_path / "out.parquet"
    caplog.set_level(logging.DEBUG)

    assert main(["--root", str(root), "embed", "medical", str(folder), "--out", str(out)]) == 0

    keys, vectors = read_embeddings(out)
    quarantine = [json.loads(line) for line in quarantine_path(out).read_text().splitlines()]
    assert len(keys) == 3 and all(key.startswith("key-") for key in keys)
    assert len(quarantine) == 2 and all(q["key"].startswith("key-") for q in quarantine)
    written = out.read_bytes() + quarantine_path(out).read_bytes()
    output = caplog.text + "".join(capfd.readouterr())
    assert "2 quarantined" in output  # the command did print and log
    for value in planted:
        assert value.encode() not in written and value not in output, value
    # the copies of the reference corpus embed as the reference run's fine-tune embeds them
    cfg, domain = load_config("medical", root / "params.yaml")
    public = public_namer(domain, cfg, create_salt=False)
    corpus = cfg.resolve(cfg.corpus)
    manifest = {row["key"]: row["sha256"] for row in map(json.loads, (root / "data/medical/manifest/manifest.jsonl")
                                                           .read_text().splitlines())}
    records = [manifest[public("key", v.relative_to(corpus).as_posix())] for v in volumes]
    theirs = pipeline_embeddings(root, "medical", records)
    ours = dict(zip(keys, vectors))
    gap = max(np.abs(ours[public("key", f"Planted_case_{i}.nii.gz")] - theirs[record]).max()
              for i, record in enumerate(records))
    assert gap < 1e-5, gap


def fails_in_one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_an_export_folder_embeds_elsewhere_as_its_project_does_and_a_changed_one_is_refused(
        pretrained_project: Path, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another team holds the export folder and this project, not the exporting project's params.yaml,
    runs or salt: `embed EXPORT_DIR` reads, preprocesses and embeds as `embed <block>` does there."""
    root = pretrained_project
    tmp_path = tmp_path_factory.mktemp("elsewhere")  # outside the exporting project
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    for name, source in zip(["a.txt", "sub/b.md", "c.txt"], sorted((root / "data/legal/default/corpus").glob("*.txt"))):
        shutil.copy(source, folder / name)
    (folder / "sub/records.jsonl").write_text(json.dumps({"text": "Permission is hereby granted"}) + "\n{not json\n")
    (folder / "empty.txt").write_bytes(b"")
    export = tmp_path / "received" / "legal-encoder"
    shutil.copytree(export_folder(root, "legal"), export)
    team = tmp_path / "team"  # the receiving team's working root: no params.yaml
    team.mkdir()

    theirs_file, ours_file = tmp_path / "theirs.parquet", tmp_path / "ours.parquet"
    assert main(["--root", str(team), "embed", str(export), str(folder), "--out", str(theirs_file)]) == 0
    embed(root, "legal", folder, ours_file)

    (keys, theirs), (our_keys, ours) = read_embeddings(theirs_file), read_embeddings(ours_file)
    assert keys == our_keys == ["a.txt", "c.txt", "sub/b.md", "sub/records.jsonl#L1"]
    assert np.abs(theirs - ours).max() < 1e-5
    assert quarantine_path(theirs_file).read_text() == quarantine_path(ours_file).read_text()
    about = pq.read_schema(theirs_file).metadata
    assert about[b"ssl_pipeline.domain"] == b"legal" and about[b"ssl_pipeline.export_manifest_sha256"] == \
        sha256(export / "manifest.json").encode()
    assert list(team.iterdir()) == []  # nothing of the project is needed or made there (no pseudonyms: no salt)

    def refused(*extra: str) -> str:
        return fails_in_one_line(capsys, "--root", str(team), "embed", *extra, "--out", str(tmp_path / "x.parquet"))

    assert "an export folder holds one encoder" in refused(str(export), str(folder), "--init", "generic")
    weights = export / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert "does not match its manifest.json (changed: model.safetensors)" in refused(str(export), str(folder))
    weights.write_bytes(original)
    (export / "ssl_pipeline.json").unlink()
    assert "(missing: ssl_pipeline.json)" in refused(str(export), str(folder))
    assert "a folder without manifest.json, so no export" in refused(str(folder), str(folder))
    assert not (tmp_path / "x.parquet").exists()


def test_a_pseudonymising_export_keys_a_folder_with_the_receiving_teams_salt(
        pretrained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The export carries no salt: where its block pseudonymises, keys are salted with the salt of
    the team that embeds (made on first use under its root, as ingest makes it), so they are that
    team's pseudonyms and cannot be matched against the exporter's."""
    root = pretrained_project
    tmp_path = tmp_path_factory.mktemp("elsewhere")  # outside the exporting project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["domains"]["legal"]["privacy"] = {"pseudonymise": True, "salt_file": "exporter-secrets/salt"}
    write_params(root, params)
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(next((root / "data/legal/default/corpus").glob("*.txt")), folder / "Doe_contract.txt")
    export = export_folder(root, "legal", out=tmp_path / "export")
    assert "exporter-secrets" not in (export / "ssl_pipeline.json").read_text()
    team = tmp_path / "team"

    theirs_file, ours_file = tmp_path / "theirs.parquet", tmp_path / "ours.parquet"
    embed(team, str(export), folder, theirs_file)
    embed(root, "legal", folder, ours_file)

    (keys, theirs), (our_keys, ours) = read_embeddings(theirs_file), read_embeddings(ours_file)
    salt = team / ".secrets/pseudonym-salt"  # privacy.salt_file's default, under the team's root
    assert salt.is_file() and salt.read_bytes() != (root / "exporter-secrets/salt").read_bytes()
    assert keys == [Pseudonymiser(salt.read_bytes().strip())("key", "Doe_contract.txt")] != our_keys
    assert np.abs(theirs - ours).max() < 1e-5
