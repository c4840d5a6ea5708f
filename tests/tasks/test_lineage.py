from __future__ import annotations

from pathlib import Path

import yaml

from tasks.cli import run_stage
from tasks.io import read_json, read_jsonl
from tasks.lineage import read_record, show, verify, which
from tests.conftest import run_stages, tiny_params, write_params


def test_verify_passes_then_names_a_changed_raw_file_and_artifact(ingested_project: Path) -> None:
    assert verify(ingested_project / "data/legal/shards", ingested_project) == []
    raw = sorted((ingested_project / "data/legal/default/corpus").glob("*.txt"))[3]
    raw.write_text(raw.read_text() + "\nAmended by a later clause.")
    problems = verify(ingested_project / "data/legal/shards", ingested_project)
    assert problems == [f"raw file {raw.relative_to(ingested_project).as_posix()}: content changed"]
    ((ingested_project / "data/legal/manifest") / "summary.json").write_text("{}")
    assert "data/legal/manifest/summary.json: content changed" in verify(ingested_project / "data/legal/shards", ingested_project)


def test_rebuilt_upstream_is_detected_and_show_reaches_raw_hashes(ingested_project: Path) -> None:
    ((ingested_project / "data/legal/default/corpus") / "extra.txt").write_text("A new contract appears.")
    run_stage("ingest", "legal", ingested_project)  # the manifest changes, but the shards were made from the old one
    problems = verify(ingested_project / "data/legal/shards", ingested_project)
    assert any("re-made since data/legal/shards was built" in p for p in problems)
    run_stage("preprocess", "legal", ingested_project)
    assert verify(ingested_project / "data/legal/shards", ingested_project) == []
    text = show(ingested_project / "data/legal/shards", ingested_project)
    assert "[preprocess@legal]" in text and "[ingest@legal]" in text and "raw corpus" in text


def test_verify_names_an_edited_labels_csv(ingested_project: Path) -> None:
    shards = ingested_project / "data/legal/shards"
    assert verify(shards, ingested_project) == []
    labels = ingested_project / "data/legal/default/labels.csv"
    lines = labels.read_text().splitlines()
    path, label, *rest = lines[1].split(",")
    other = next(line.split(",")[1] for line in lines[2:] if line.split(",")[1] != label)
    lines[1] = ",".join([path, other, *rest])  # one label poisoned after ingest
    labels.write_text("\n".join(lines) + "\n")
    assert verify(shards, ingested_project) == [
        "input file data/legal/default/labels.csv: content changed since ingest@legal read it"]
    labels.unlink()
    assert verify(shards, ingested_project) == [
        "input file data/legal/default/labels.csv: missing (read by ingest@legal)"]


def manifest_rows(root: Path) -> list[dict]:
    return read_jsonl(root / "data/legal/manifest/manifest.jsonl")


def test_which_names_the_shards_checkpoints_and_models_that_consumed_a_record(pretrained_project: Path) -> None:
    tiny_project = pretrained_project
    write_params(tiny_project, tiny_params(finetune={"inits": ["ssl"], "protocols": ["finetune"], "seeds": [0]}))
    run_stages(tiny_project, "legal", "finetune")
    rows = manifest_rows(tiny_project)
    trained = next(r for r in rows if r["split"] == "train" and r.get("label") is not None)
    answer = which(trained["key"], tiny_project)
    assert f"record {trained['key']}" in answer and "manifest    data/legal/manifest/manifest.jsonl" in answer
    assert "shards      data/legal/shards: pretrain_train, labeled" in answer
    assert "pretrain    models/legal/pretrain (trained on)" in answer
    checkpoints = sorted(p.name for p in (tiny_project / "models/legal/checkpoints").glob("step_*.pt"))
    assert checkpoints and f"checkpoints models/legal/checkpoints: {', '.join(checkpoints)}" in answer
    assert "finetune    models/legal/finetune (in the labeled pool" in answer and "models ssl_fraction-" in answer
    assert "re-run" not in answer  # everything was built from what is on disk now
    # the same answer by content hash, and by the path as written in params.yaml
    assert which(trained["sha256"], tiny_project) == answer
    assert which(f"data/legal/default/corpus/{trained['key']}", tiny_project) == answer
    tested = next(r for r in rows if r["split"] == "test" and r.get("label") is not None)
    answer = which(tested["key"], tiny_project)
    assert "shards      data/legal/shards: labeled" in answer and "pretrain    " not in answer
    assert "in the labeled test set: scored, never trained on" in answer
    assert which("no-such-file.txt", tiny_project).startswith("no record no-such-file.txt in any manifest")
    # a manifest rebuilt after the shards: the shards are named as stale
    (tiny_project / "data/legal/default/corpus/extra.txt").write_text("A late amendment to the agreement.")
    run_stages(tiny_project, "legal", "ingest")
    assert "(built from an older input: re-run)" in which(trained["key"], tiny_project)


def test_which_takes_the_raw_file_name_when_the_domain_pseudonymises(tiny_project: Path) -> None:
    write_params(tiny_project, tiny_params(privacy={"pseudonymise": True}))
    run_stages(tiny_project, "legal", "default_data", "ingest", "preprocess")
    raw = sorted((tiny_project / "data/legal/default/corpus").glob("*.txt"))[0]
    answer = which(raw.name, tiny_project)
    assert answer.startswith("domain legal:") and "record key-" in answer
    assert raw.name not in answer and raw.stem not in answer  # only the pseudonym is printed


def test_removing_a_record_and_re_running_rebuilds_what_depended_on_it(ingested_project: Path) -> None:
    """What DVC does after a consent withdrawal: the corpus is a dep of ingest and preprocess, so
    `dvc repro` re-runs them and everything downstream; here the same two stages, by hand."""
    rows = manifest_rows(ingested_project)
    withdrawn = next(r for r in rows if r["split"] == "train")
    before = read_record(ingested_project / "data/legal/shards")["outputs_digest"]
    tokens = read_json(ingested_project / "data/legal/shards/summary.json")["pretrain_train_tokens"]
    assert which(withdrawn["key"], ingested_project).startswith("domain legal:")
    (ingested_project / "data/legal/default/corpus" / withdrawn["key"]).unlink()
    labels = ingested_project / "data/legal/default/labels.csv"  # and its label, if it had one
    labels.write_text("".join(line for line in labels.read_text().splitlines(keepends=True)
                              if not line.startswith(f"{withdrawn['key']},")))
    run_stages(ingested_project, "legal", "ingest", "preprocess")
    assert which(withdrawn["key"], ingested_project).startswith(f"no record {withdrawn['key']}")
    assert which(withdrawn["sha256"], ingested_project).startswith("no record")
    assert read_record(ingested_project / "data/legal/shards")["outputs_digest"] != before
    assert read_json(ingested_project / "data/legal/shards/summary.json")["pretrain_train_tokens"] < tokens
    assert verify(ingested_project / "data/legal/shards", ingested_project) == []


def test_diff_names_the_raw_file_params_and_outputs_that_differ_between_two_runs(
        built_legal, tmp_path: Path) -> None:
    """Run B: one raw file edited and the pretrain seed changed, then re-run; the diff names both,
    and which artifacts' outputs changed; a run against its own copy differs in nothing."""
    from tasks.cli import main
    from tasks.lineage import diff
    from tests.conftest import copy_project

    a = copy_project(built_legal("pretrain"), tmp_path / "a")
    b = copy_project(built_legal("pretrain"), tmp_path / "b")
    assert diff(a / "models/legal/pretrain", b / "models/legal/pretrain") == []
    edited = sorted((b / "data/legal/default/corpus").rglob("*.txt"))[3]
    edited.write_text(edited.read_text(encoding="utf-8") + "\nAn added clause.\n", encoding="utf-8")
    params = yaml.safe_load((b / "params.yaml").read_text())
    params["domains"]["legal"]["pretrain"]["seed"] = 5
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(b, "legal", "ingest", "preprocess", "pretrain")
    lines = diff(a / "models/legal/pretrain", b / "models/legal/pretrain")
    key = edited.relative_to(b / "data/legal/default/corpus").as_posix()
    assert f"ingest@legal raw file {key}: changed" in lines
    assert "pretrain@legal param pretrain.seed: 0 -> 5" in lines
    assert {"data/legal/manifest", "data/legal/shards", "models/legal/pretrain"} == {
        line.split(":")[0] for line in lines if "outputs differ" in line}
    assert not any("only in" in line for line in lines)
    assert main(["lineage", "diff", str(a / "models/legal/pretrain"), str(b / "models/legal/pretrain")]) == 1
