"""Adding an SSL method is one file and one registration line: a toy method written into a
temporary folder, registered with the legal domain, runs the real pretrain stage, and its class
alone decides the checkpoint rule (no list of method names in core or the stages)."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import pretrained_state

TOY_METHOD = '''
"""A toy joint-embedding method: the pooled features of a block's two halves pulled together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssl_models.core.config import require
from ssl_models.core.modules import DataSide, PretrainMethod


@dataclass
class ToyOptions:
    weight: float = 1.0

    def validate(self, where: str) -> None:
        require(self.weight > 0, f"{where}.weight", "must be positive")


@dataclass
class Blocks(DataSide):
    def __call__(self, rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.as_tensor([row["input_ids"] for row in rows], dtype=torch.long)}


class ToyMethod(PretrainMethod):
    checkpoint_rule = "rankme"

    def data_side(self) -> Blocks:
        return Blocks()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        half = ids.shape[1] // 2
        first = self.backbone_encoder.hidden_states(ids[:, :half]).mean(dim=1)
        second = self.backbone_encoder.hidden_states(ids[:, half:]).mean(dim=1)
        return self.options.weight * (first - second).square().mean()

    def embed(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        ids = torch.as_tensor([s["input_ids"] for s in samples])
        return self.backbone_encoder.hidden_states(ids).mean(dim=1)
'''


def test_a_method_in_one_file_and_one_line_pretrains_and_declares_its_checkpoint_rule(
        ingested_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_models.legal_text.config import METHODS

    # the registry's tables are copies for this test, put back afterwards: no other test sees "toy"
    for table in ("_entries", "_lazy", "_options"):
        monkeypatch.setattr(METHODS, table, dict(getattr(METHODS, table)))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))  # the one new file
    monkeypatch.syspath_prepend(str(plugins))
    try:
        from toy_method import ToyOptions

        METHODS.register_lazy("toy", "toy_method:ToyMethod", options=ToyOptions)  # the one line

        _, log = pretrained_state(ingested_project, "legal", method="toy")
    finally:
        sys.modules.pop("toy_method", None)

    assert (ingested_project / "models/legal/pretrain/encoder/model.safetensors").exists()
    assert [step for step, _ in log["loss"]] == list(range(1, 13))  # every planned step ran
    assert all(math.isfinite(loss) for _, loss in log["loss"])
    assert log["checkpoints"][-1]["loss"] < log["checkpoints"][0]["loss"]  # it learns
    # the toy class declares rankme: the encoder is the logged checkpoint of highest RankMe
    best = max(log["checkpoints"], key=lambda c: (c["rankme"], c["step"]))
    assert log["choice"]["rule"] == "rankme" and log["choice"]["step"] == best["step"]
    assert log["choice"]["reason"] == ("toy is a joint-embedding method: the logged checkpoint of highest RankMe "
                                       "(label-free, Garrido et al. 2023)")


def test_the_toy_method_is_gone_after_the_test() -> None:
    from ssl_models.legal_text.config import METHODS

    assert "toy" not in METHODS and "toy_method" not in sys.modules
