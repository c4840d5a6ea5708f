"""RankMe: the effective rank of a set of embeddings, a label-free quality signal, and the rule
that picks a pretraining run's encoder among its logged checkpoints.

Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023. A collapsed encoder scores near 1; higher is
usually better for downstream probes. The paper validates it on joint-embedding methods
(SimCLR, VICReg, BYOL, DINO, ...), not on reconstruction or masked-prediction objectives.
"""

from __future__ import annotations

from typing import Any

import torch


def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy) of the normalised singular values of `embeddings` [n, dim]."""
    singular_values = torch.linalg.svdvals(embeddings.double())
    p = singular_values / (singular_values.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def choice_rule(setting: str, method_name: str, rule: str) -> tuple[str, str]:
    """(`rankme` | `last`, why) for `pretrain.checkpoint_choice` = `setting` and the pretraining
    method `method_name`, whose class declares `rule` (`PretrainMethod.checkpoint_rule`)."""
    if setting != "auto":
        return setting, f"pretrain.checkpoint_choice is {setting}"
    if rule == "rankme":
        return "rankme", (f"{method_name} is a joint-embedding method: the logged checkpoint of highest RankMe "
                          "(label-free, Garrido et al. 2023)")
    return "last", (f"{method_name} is a reconstruction or masked-prediction objective, where RankMe is not "
                    "validated (Garrido et al. 2023): the last checkpoint")


def choose_checkpoint(rule: str, checkpoints: list[dict[str, Any]], available: set[int]) -> int:
    """The step chosen by `rule` among logged `checkpoints` ({"step", "rankme", ...}) whose
    encoder is `available`: the last, or the highest RankMe (the later one on a tie)."""
    kept = [c for c in checkpoints if c["step"] in available]
    if rule == "last" or not kept:
        return checkpoints[-1]["step"]
    return max(kept, key=lambda c: (c["rankme"], c["step"]))["step"]


def candidate_steps(logged_steps: list[int], keep: int, checkpoints: list[dict[str, Any]]) -> set[int]:
    """The logged checkpoints whose encoders a run keeps: `keep - 1` spread evenly over the
    planned `logged_steps` (the first and the last among them), plus the highest RankMe of
    those logged so far (`checkpoints`): at most `keep`, never fewer than the last and the best."""
    spread = max(1, keep - 1)
    if spread >= len(logged_steps):
        chosen = set(logged_steps)
    elif spread == 1:
        chosen = {logged_steps[-1]}
    else:
        chosen = {logged_steps[round(j * (len(logged_steps) - 1) / (spread - 1))] for j in range(spread)}
    if checkpoints:
        chosen.add(max(checkpoints, key=lambda c: (c["rankme"], c["step"]))["step"])
    return chosen
