from __future__ import annotations

import torch

from ssl_models.core.config import PretrainConfig
from ssl_models.core.schedules import make_schedule


def learning_rates(schedule: str) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_schedule(optimizer, PretrainConfig(steps=100, warmup_steps=10, schedule=schedule,
                                                        decay_fraction=0.2))
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_wsd_warms_up_holds_then_decays_in_the_last_fifth() -> None:
    rates = learning_rates("wsd")
    assert rates[0] == 0.0 and rates[5] == 0.5
    assert all(r == 1.0 for r in rates[10:80])  # stable phase: can be extended or stopped here
    assert rates[90] < 0.6 and rates[99] < 0.01


def test_cosine_decays_from_the_end_of_warmup() -> None:
    rates = learning_rates("cosine")
    assert rates[10] == 1.0 and 0.45 < rates[55] < 0.55 and rates[99] < 0.01
