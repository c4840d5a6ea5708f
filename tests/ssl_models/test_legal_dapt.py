"""What makes continued MLM pretraining affordable, held by tests: the vocabulary projection
scores the masked positions only, and pretraining blocks are packed (no padding to pay for)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_models.core.config import load_config
from ssl_models.core.modules import sample_seeds
from ssl_models.legal_text.views import IGNORE_INDEX
from tasks.paths import DomainPaths
from tests.ssl_models.test_legal_methods import method_and_batch


@pytest.mark.parametrize("method", ["mlm", "mlm_span_contrastive"])
def test_the_mlm_head_sees_exactly_the_masked_positions(ingested_project: Path, method: str) -> None:
    model, batch, _ = method_and_batch(ingested_project, method, 8)
    seen: list[torch.Size] = []
    model.head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model(batch).backward()
    masked = int((batch["labels"] != IGNORE_INDEX).sum())
    assert 0 < masked < 0.3 * batch["labels"].numel()  # ~15% of the tokens
    # one call, on the masked rows only: [masked, vocabulary], never [batch, length, vocabulary]
    assert seen == [torch.Size([masked, len(model.backbone_encoder.tokenizer)])]


def test_pretraining_rows_are_packed_blocks_without_padding(ingested_project: Path) -> None:
    cfg, domain = load_config("legal", ingested_project / "params.yaml")
    shards = DomainPaths("legal", ingested_project).shards
    model = domain.build_pretrain_method(cfg, shards)
    tokenizer = model.backbone_encoder.tokenizer
    rows = domain.pretrain_dataset(shards, "train")
    ids = torch.as_tensor([rows[i]["input_ids"] for i in range(len(rows))])
    assert ids.shape == (len(rows), cfg.preprocess.block_size)  # every block full length
    assert not (ids == tokenizer.pad_token_id).any()
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    batch = model.data_side()([rows[i] for i in range(4)], sample_seeds(0, 0, range(4)))
    assert batch["input_ids"].shape == (4, cfg.preprocess.block_size)  # no attention mask, none needed
