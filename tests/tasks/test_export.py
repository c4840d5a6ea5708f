"""`ssl-pipeline export`: the encoder leaves the pipeline in its field's format, and another team
loads it with that library alone, in a process where this project cannot be imported, strictly
(no missing or unexpected key), and embeds as the pipeline does; the manifest catches a change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ssl_models.core.config import load_config
from tasks.cli import main
from tasks.export import export, verify
from tasks.paths import DomainPaths
from tests.conftest import stage_env

# The other team's process: the field's library only. The editable install puts this project on
# sys.path, so its packages are refused explicitly, and the refusal is checked.
ISOLATED = '''
import importlib.abc, json, sys

PROJECT = ("ssl_models", "tasks", "flows", "benchmarks", "tests")

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"{name}: this project is not installed here")

sys.meta_path.insert(0, Refuse())
for name in PROJECT:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} could be imported")

folder, texts_file, out_file = sys.argv[1:4]
card = open(f"{folder}/README.md").read()
snippet = card.split("```python\\n", 1)[1].split("```", 1)[0]
scope = {}
exec(snippet.replace('FOLDER = "."', f"FOLDER = {folder!r}"), scope)
from transformers import AutoModel
_, info = AutoModel.from_pretrained(folder, output_loading_info=True)
embeddings = scope["embed"](json.load(open(texts_file)))
json.dump({"embeddings": embeddings.tolist(), "loading": {k: list(v) for k, v in info.items()}},
          open(out_file, "w"))
'''


def test_the_legal_export_loads_strictly_without_the_project_and_embeds_as_the_pipeline(
        pretrained_project: Path, tmp_path: Path) -> None:
    root = pretrained_project
    folder = export(root, "legal")
    assert folder == root / "models/legal/export"
    # texts of every length: one window, several (past max_length tokens), beyond the document budget
    corpus = sorted((root / "data/legal/default/corpus").rglob("*.txt"))[:5]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in corpus] + ["MIT License", "x " * 400]
    cfg, domain = load_config("legal", root / "params.yaml")
    paths = DomainPaths("legal", root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    assert len(encoder.tokenizer(texts[-1])["input_ids"]) > encoder.max_length  # windows are exercised
    with torch.no_grad():
        ours = encoder(encoder.collate([{"text": t} for t in texts]))

    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", ISOLATED, str(folder), str(tmp_path / "texts.json"),
                          str(tmp_path / "theirs.json")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((tmp_path / "theirs.json").read_text())
    loading = theirs["loading"]
    assert loading["missing_keys"] == [] and loading["unexpected_keys"] == [], loading
    gap = (torch.tensor(theirs["embeddings"]) - ours).abs().max().item()
    assert gap < 1e-5, gap

    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "lineage verify models/legal/pretrain" in card and "corpus/" not in card

    assert verify(folder) == []
    assert main(["export", "verify", str(folder)]) == 0
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    (folder / "extra.txt").write_text("x")
    assert verify(folder) == ["not in the manifest: extra.txt", "changed: model.safetensors"]
    assert main(["export", "verify", str(folder)]) == 1


def test_export_before_pretrain_and_an_unknown_init_are_one_line(ingested_project: Path,
                                                                capsys) -> None:
    assert main(["--root", str(ingested_project), "export", "legal"]) == 2
    assert "run `ssl-pipeline pretrain legal`" in capsys.readouterr().err
    assert main(["--root", str(ingested_project), "export", "legal", "--init", "scratch"]) == 2
    assert "one of ssl, generic" in capsys.readouterr().err
