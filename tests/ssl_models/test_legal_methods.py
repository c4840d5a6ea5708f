from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_models.core.config import load_domain_config
from ssl_models.core.domain import load_domain
from ssl_models.legal_text.config import TEXT_METHODS
from tests.conftest import tiny_params, write_params


@pytest.mark.parametrize("method", TEXT_METHODS.names())
def test_each_text_method_lowers_its_loss_in_a_few_steps(ingested_project: Path, method: str) -> None:
    write_params(ingested_project, tiny_params(pretrain={"method": method}))
    cfg = load_domain_config("legal")
    domain = load_domain(cfg)
    torch.manual_seed(0)
    model = domain.build_pretrain_method(cfg, Path("data/legal/shards"))
    rows = domain.pretrain_dataset(Path("data/legal/shards"), "train")
    batch_rows = [rows[i] for i in range(16)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        torch.manual_seed(1)  # the same masks each step: the loss must fall on a fixed batch
        loss = model(model.collate(batch_rows))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.embed(batch_rows[:4]).shape == (4, 32)
