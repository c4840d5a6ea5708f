"""`ssl-pipeline export`: the encoder leaves the pipeline in its field's format, and another team
loads it with that library alone, in a process where this project cannot be imported, strictly
(no missing or unexpected key), and embeds as the pipeline does; the manifest catches a change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssl_models.core.config import load_config
from tasks.cli import main
from tasks.export import export, verify
from tasks.paths import DomainPaths
from tests.conftest import stage_env

# The other team's process: the field's library only. The editable install puts this project on
# sys.path, so its packages are refused explicitly, and the refusal is checked.
ISOLATED = '''
import importlib.abc, json, os, sys

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

folder, inputs_file, out_file = sys.argv[1:4]
card = open(f"{folder}/README.md").read()
snippet = card.split("```python\\n", 1)[1].split("```", 1)[0]
scope = {}
exec(snippet.replace('FOLDER = "."', f"FOLDER = {folder!r}"), scope)
if inputs_file.endswith(".json"):  # texts
    inputs = json.load(open(inputs_file))
else:  # images, or a list of clips
    import torch
    inputs = torch.load(inputs_file)
config = os.path.join(folder, "config.json")
if os.path.exists(config) and "model_type" in json.load(open(config)):  # transformers: its own report of the load
    from transformers import AutoModel
    _, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    loading = {k: list(v) for k, v in info.items()}
else:  # timm, MONAI: the snippet's own load_state_dict(strict=True) raises on a mismatch
    loading = None
embeddings = scope["embed"](inputs)
json.dump({"embeddings": embeddings.tolist(), "loading": loading}, open(out_file, "w"))
'''

def load_elsewhere(folder: Path, inputs: Path, work: Path) -> torch.Tensor:
    """The embeddings the export's card snippet gives in a process without this project."""
    env = {k: v for k, v in stage_env().items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", ISOLATED, str(folder), str(inputs), str(work / "theirs.json")],
                         cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads((work / "theirs.json").read_text())
    if theirs["loading"] is not None:  # transformers' own report of the load
        assert theirs["loading"]["missing_keys"] == [] and theirs["loading"]["unexpected_keys"] == [], theirs["loading"]
    else:  # a strict load_state_dict, which raises (and the process fails) on any missing or extra key
        assert "load_state_dict(" in (card := (folder / "README.md").read_text()) and "strict=True)" in card
    return torch.tensor(theirs["embeddings"])


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
    gap = (load_elsewhere(folder, tmp_path / "texts.json", tmp_path) - ours).abs().max().item()
    assert gap < 1e-5, gap

    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "lineage verify models/legal/pretrain" in card and "corpus/" not in card

    assert verify(folder) == []
    assert "ssl_pipeline.json" in json.loads((folder / "manifest.json").read_text())["files"]  # what embed reads
    assert "data/legal" not in (folder / "ssl_pipeline.json").read_text()  # no corpus or labels path
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in folder.rglob("*"))  # readable by the receiving team
    assert main(["export", "verify", str(folder)]) == 0
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    (folder / "extra.txt").write_text("x")
    assert verify(folder) == ["not in the manifest: extra.txt", "changed: model.safetensors"]
    assert main(["export", "verify", str(folder)]) == 1


def test_export_before_pretrain_and_an_unknown_init_are_one_line(ingested_project: Path,
                                                                capsys) -> None:
    assert main(["--root", str(ingested_project), "export", "legal"]) == 2  # the stage
    assert "export@legal reads models/legal/pretrain, which does not exist; run pretrain@legal first" in \
        capsys.readouterr().err
    assert main(["--root", str(ingested_project), "export", "legal", "--out", "elsewhere"]) == 2
    assert "run `ssl-pipeline pretrain legal`" in capsys.readouterr().err
    assert main(["--root", str(ingested_project), "export", "legal", "--init", "scratch"]) == 2
    assert "one of ssl, generic" in capsys.readouterr().err


@pytest.mark.slow  # reads the domain's reference run, which every stage built, export included
def test_the_export_stage_card_tells_a_governance_board_what_it_needs(reference_run) -> None:
    run = reference_run("legal")
    folder = DomainPaths("legal", run.root).export
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = json.loads((run.root / "reports/legal/metrics.json").read_text())
    ssl_best = [row for row in metrics["best_protocols"] if row["init"] == "ssl"]
    assert sorted(m["value"] for m in front["model-index"][0]["results"][0]["metrics"] if m["name"].startswith("ssl")) \
        == sorted(row["mean"] for row in ssl_best)
    for section in ("## Intended use", "## Out-of-scope uses", "## How to load it", "## Data statement",
                    "## Evaluation", "## Limitations", "## Provenance"):
        assert section in card, section
    summary = json.loads((run.root / "data/legal/manifest/summary.json").read_text())
    assert f"Files: {summary['files']} read, {summary['records']} records kept" in card
    assert "De-identification: none" in card and "RankMe" in card
    for row in ssl_best:  # the verdict per fraction, in words, as the report gives it
        assert f"**{row['label_fraction']:.0%} of labels**" in card
    assert verify(folder) == []


@pytest.mark.slow  # reads the domain's reference run
def test_a_fine_tuned_encoder_exports_with_its_head_and_loads_without_the_project(reference_run,
                                                                                  tmp_path: Path) -> None:
    run = reference_run("legal")  # read-only: the export goes to tmp_path
    assert main(["--root", str(run.root), "export", "legal", "--finetuned", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["--root", str(run.root), "export", "legal", "--finetuned", "1", "--out", str(tmp_path / "ft")]) == 0
    folder = tmp_path / "ft"
    cfg, domain = load_config("legal", run.root / "params.yaml")
    paths = DomainPaths("legal", run.root)
    saved = paths.finetune / "models" / "ssl_fraction-1.0_seed-0"
    tuned = domain.load_encoder("ssl", cfg, paths.shards, saved / "encoder", seed=0).eval()
    pretrained = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    texts = [p.read_text(encoding="utf-8") for p in sorted((run.root / "data/legal/default/corpus").rglob("*.txt"))[:4]]
    with torch.no_grad():
        ours = tuned(tuned.collate([{"text": t} for t in texts]))
        before = pretrained(pretrained.collate([{"text": t} for t in texts]))
    assert (ours - before).abs().max() > 1e-3  # fine-tuning moved it: this is not the pretrained encoder
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    assert (load_elsewhere(folder, tmp_path / "texts.json", tmp_path) - ours).abs().max().item() < 1e-5
    from safetensors.torch import load_file

    head, classes = load_file(str(folder / "head.safetensors")), json.loads((folder / "classes.json").read_text())
    assert head["weight"].shape == (len(classes), tuned.dim) and classes == json.loads((saved / "classes.json").read_text())
    card = (folder / "README.md").read_text()
    assert "fine-tuned on 100% of the labels" in card and "head.safetensors" in card
    assert verify(folder) == []


@pytest.mark.slow  # reads the export stage's output of the domain's reference run (built once per session)
def test_the_medical_export_is_a_monai_bundle_that_loads_strictly_without_the_project(reference_run,
                                                                                     tmp_path: Path) -> None:
    """On the medical reference run (pseudonymised: its raw names must not reach the card)."""
    run = reference_run("medical")  # read-only
    folder = DomainPaths("medical", run.root).export  # the export stage's, in the reference run
    for part in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.safetensors",
                 "docs/README.md", "README.md", "manifest.json"):
        assert (folder / part).is_file(), part
    metadata = json.loads((folder / "configs/metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    cfg, domain = load_config("medical", run.root / "params.yaml")
    assert metadata["preprocessing"]["orientation"] == "RAS"
    assert metadata["preprocessing"]["spacing_mm"] == (cfg.preprocess.spacing or "each volume's own (not resampled)")
    paths = DomainPaths("medical", run.root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    rows = [domain.pretrain_dataset(paths.shards, "train")[i] for i in range(3)]
    batch = encoder.collate(rows)
    with torch.no_grad():
        ours = encoder(batch)
    torch.save(batch["image"], tmp_path / "images.pt")
    gap = (load_elsewhere(folder, tmp_path / "images.pt", tmp_path) - ours).abs().max().item()
    assert gap < 1e-5, gap
    card = (folder / "README.md").read_text()
    # whole file names ("anatomical.nii"; "anatomical" alone is a word of the task's description)
    raw_names = [p.name for p in (run.root / "data/medical/default/corpus").rglob("*") if p.is_file()]
    assert raw_names and not [name for name in raw_names if name in card]
    assert verify(folder) == []


@pytest.mark.slow  # reads the export stage's output of the domain's reference run
def test_the_histopathology_export_is_a_timm_model_that_loads_strictly_without_the_project(reference_run,
                                                                                          tmp_path: Path) -> None:
    run = reference_run("histo")  # read-only
    folder = DomainPaths("histo", run.root).export  # the export stage's, in the reference run
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] and config["ssl_pipeline_preprocessing"]["tile_size"]
    cfg, domain = load_config("histo", run.root / "params.yaml")
    paths = DomainPaths("histo", run.root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    rows = [domain.pretrain_dataset(paths.shards, "train")[i] for i in range(4)]
    with torch.no_grad():
        ours = encoder(encoder.collate([{"pixels": [row["pixels"]]} for row in rows]))
    side = encoder.image_size
    tiles = torch.stack([torch.frombuffer(bytearray(row["pixels"]), dtype=torch.uint8).view(side, side, 3)
                         for row in rows])
    torch.save(tiles, tmp_path / "tiles.pt")
    gap = (load_elsewhere(folder, tmp_path / "tiles.pt", tmp_path) - ours).abs().max().item()
    assert gap < 1e-5, gap
    assert verify(folder) == []


def write_card(folder: Path, about: dict) -> None:
    """The card's snippet, for an export written by the domain's hook alone."""
    (folder / "README.md").write_text(f'```python\nFOLDER = "."  # this folder\n{about["snippet"]}```\n')


@pytest.mark.parametrize("backbone", ["spectrogram_transformer", "wav2vec2"])
def test_the_audio_exports_load_strictly_without_the_project_and_embed_as_the_pipeline(
        backbone: str, tmp_path: Path) -> None:
    """Both audio backbones, built here with every option the export must carry (per-bin
    statistics, each clip's own mean, several pooling segments, patches of part of the mel
    bins, a window that is not a whole number of patches), on clips shorter and longer than it."""
    from ssl_models.audio.features import decode_row, encode_row
    from tests.conftest import write_params
    from tests.ssl_models.test_audio_pipeline import audio_params

    model = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32, "pool_segments": 2}
    if backbone == "wav2vec2":
        block = audio_params(model={**model, "backbone": "wav2vec2"}, preprocess={"input": "waveform"},
                             pretrain={"method": "wav2vec2"})
    else:
        # 56 wide with 488 MLP units: int(56 * (488 / 56)) is 487, a float's rounding timm must not see
        block = audio_params(model={**model, "hidden_size": 56, "num_heads": 4, "intermediate_size": 488,
                                    "patch_frames": 3, "patch_mels": 8, "clip_mean": True})
    write_params(tmp_path, block)
    cfg, domain = load_config("audio", tmp_path / "params.yaml")
    torch.manual_seed(0)
    encoder = domain.build_encoder(cfg, tmp_path / "no-shards").eval()
    spec = encoder.spec
    if backbone != "wav2vec2":
        assert spec.clip_steps % 3 and encoder.backbone.mel_patches == 2
        encoder.backbone.mean.copy_(torch.randn(spec.width))
        encoder.backbone.std.copy_(torch.rand(spec.width) + 0.5)
    generator = torch.Generator().manual_seed(1)
    rows = [encode_row(torch.randn(n, spec.width, generator=generator).numpy())
            for n in (spec.clip_steps, spec.clip_steps // 3, 5, spec.clip_steps + 7)]
    with torch.no_grad():
        ours = encoder(encoder.collate(rows))
    folder = tmp_path / "export"
    folder.mkdir()
    about = domain.export(cfg, encoder, folder)
    write_card(folder, about)
    clips = [torch.from_numpy(decode_row(row, spec.width)) for row in rows]
    torch.save([clip[:, 0] for clip in clips] if backbone == "wav2vec2" else clips, tmp_path / "clips.pt")
    gap = (load_elsewhere(folder, tmp_path / "clips.pt", tmp_path) - ours).abs().max().item()
    assert gap < 1e-5, gap
    config = json.loads((folder / "config.json").read_text())
    if backbone == "wav2vec2":  # the bare model: no quantiser, no pretraining projections
        assert config["architectures"] == ["Wav2Vec2Model"] and (folder / "preprocessor_config.json").is_file()
    else:
        assert config["ssl_pipeline_features"]["sample_rate"] == cfg.ingest.sample_rate
        assert config["model_args"]["patch_size"] == [3, 8]


@pytest.mark.slow  # reads the export stage's output of the domain's reference run
def test_the_audio_export_of_a_pretrained_run_loads_without_the_project(reference_run, tmp_path: Path) -> None:
    run = reference_run("audio")  # read-only
    folder = DomainPaths("audio", run.root).export  # the export stage's, in the reference run
    cfg, domain = load_config("audio", run.root / "params.yaml")
    paths = DomainPaths("audio", run.root)
    encoder = domain.load_encoder("ssl", cfg, paths.shards, paths.pretrain / "encoder", seed=0).eval()
    rows = [domain.pretrain_dataset(paths.shards, "train")[i] for i in range(4)]
    with torch.no_grad():
        ours = encoder(encoder.collate(rows))
    from ssl_models.audio.features import decode_row

    torch.save([torch.from_numpy(decode_row(row, encoder.spec.width)) for row in rows], tmp_path / "clips.pt")
    gap = (load_elsewhere(folder, tmp_path / "clips.pt", tmp_path) - ours).abs().max().item()
    assert gap < 1e-5, gap
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "lineage verify models/audio/pretrain" in card
    assert verify(folder) == []


@pytest.mark.parametrize("kind", ["audio-spectrogram_transformer", "audio-wav2vec2", "histo-resnet", "histo-vit",
                                  "medical-vit", "medical-resnet"])
def test_an_export_loads_back_into_the_pipeline_encoder_from_its_own_files(kind: str, tmp_path: Path) -> None:
    """`Domain.load_export`, the inverse of `export`, on an encoder built here: the block rebuilt from
    ssl_pipeline.json alone (no path of the exporter's in it), the encoder from the export's files,
    embedding as the original does."""
    from dataclasses import replace

    from ssl_models.audio.features import encode_row
    from tasks.export import SETTINGS, export_settings, read_settings
    from tests.conftest import write_params
    from tests.ssl_models.histo_files import histo_params
    from tests.ssl_models.medical_files import cube_rows, medical_params
    from tests.ssl_models.test_audio_pipeline import audio_params

    name, backbone = kind.split("-")
    if name == "audio":
        model = {"hidden_size": 56, "num_layers": 2, "num_heads": 4, "intermediate_size": 488, "pool_segments": 2,
                 "patch_frames": 3, "patch_mels": 8, "clip_mean": True}
        params = (audio_params(model=model) if backbone != "wav2vec2" else audio_params(
            model={**model, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "backbone": "wav2vec2"},
            preprocess={"input": "waveform"}, pretrain={"method": "wav2vec2"}))
    elif name == "histo":
        params = histo_params(model={"backbone": backbone, "width": 8, "depth": 1})
    else:
        params = medical_params(model={"backbone": backbone},
                                **({"pretrain": {"method": "simclr"}} if backbone == "resnet" else {}))
    write_params(tmp_path, params)
    cfg, domain = load_config(name, tmp_path / "params.yaml")
    torch.manual_seed(0)
    encoder = domain.build_encoder(cfg, tmp_path / "no-shards").eval()
    generator = torch.Generator().manual_seed(1)
    if name == "audio":
        spec = encoder.spec
        if backbone != "wav2vec2":
            encoder.backbone.mean.copy_(torch.randn(spec.width, generator=generator))
            encoder.backbone.std.copy_(torch.rand(spec.width, generator=generator) + 0.5)
        rows = [encode_row(torch.randn(n, spec.width, generator=generator).numpy())
                for n in (spec.clip_steps, spec.clip_steps // 3, 5, spec.clip_steps + 7)]
    elif name == "histo":
        side = cfg.preprocess.stored_size
        rows = [{"pixels": [torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=generator)
                            .numpy().tobytes() for _ in range(tiles)]} for tiles in (1, 3, 1)]  # a bag of 3
    else:
        rows = cube_rows(3, size=cfg.model.size)
    with torch.no_grad():
        ours = encoder(encoder.collate(rows))

    folder = tmp_path / "export"
    folder.mkdir()
    domain.export(cfg, encoder, folder)
    # as written by the export of a block with a base checkpoint at a private path
    private = replace(cfg, model=replace(cfg.model, base_checkpoint="/home/alice/checkpoints/start"))
    settings = export_settings(private, domain, "ssl")
    (folder / SETTINGS).write_text(json.dumps(settings))
    text = (folder / SETTINGS).read_text()
    assert "alice" not in text and "corpus" not in text and "salt" not in text and settings["withheld"] == [
        "model.base_checkpoint"]

    elsewhere = tmp_path / "elsewhere"  # the receiving team's root, without params.yaml
    received, received_domain, _ = read_settings(folder, elsewhere)
    assert received.root == elsewhere and received.model.base_checkpoint == str(folder.absolute())
    for section in ("ingest", "preprocess"):
        assert getattr(received, section) == getattr(cfg, section), section
    assert replace(received.model, base_checkpoint=None) == cfg.model
    assert (received.pretrain.method, received.pretrain.options) == (cfg.pretrain.method, cfg.pretrain.options)
    assert received.privacy.pseudonymise is domain.pseudonymises(cfg)
    assert received.resolve(received.privacy.salt_file).is_relative_to(elsewhere)  # the team's own salt
    loaded = received_domain.load_export(received, folder).eval()
    with torch.no_grad():
        theirs = loaded(loaded.collate(rows))
    assert theirs.shape == ours.shape and (theirs - ours).abs().max().item() < 1e-6

    from safetensors.torch import load_file, save_file

    from ssl_models.core.errors import PipelineError

    weights = folder / ("models/model.safetensors" if name == "medical" else "model.safetensors")
    state = load_file(str(weights))
    save_file(dict(list(state.items())[:-1]), str(weights))  # a tensor short: refused, not left random
    with pytest.raises(PipelineError, match="does not load exactly: 1 weight"):
        received_domain.load_export(received, folder)
