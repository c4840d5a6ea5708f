from __future__ import annotations

import torch

from ssl_models.core.config import PretrainConfig
from ssl_models.core.schedules import decay_start, make_schedule, move_schedule_to


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
    assert decay_start(PretrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2)) == 80
    assert decay_start(PretrainConfig(steps=100, warmup_steps=10, schedule="cosine")) is None


def test_cosine_decays_from_the_end_of_warmup() -> None:
    rates = learning_rates("cosine")
    assert rates[10] == 1.0 and 0.45 < rates[55] < 0.55 and rates[99] < 0.01


def _plan(steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=3e-3)
    return optimizer, make_schedule(optimizer, PretrainConfig(steps=steps, warmup_steps=4, schedule="wsd",
                                                              decay_fraction=0.25))


def _rates_from(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_a_wsd_state_of_a_shorter_plan_moved_to_a_longer_one_follows_the_longer_plan_exactly() -> None:
    """Extending steps 40 -> 100 from the checkpoint where the 40-step plan's decay starts (30)."""
    short_optimizer, short = _plan(40)
    _rates_from(short_optimizer, short, 30)
    saved_optimizer, saved_scheduler = short_optimizer.state_dict(), short.state_dict()

    fresh_optimizer, fresh = _plan(100)
    expected = _rates_from(fresh_optimizer, fresh, 100)

    optimizer, scheduler = _plan(100)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    move_schedule_to(scheduler, 30)
    assert _rates_from(optimizer, scheduler, 70) == expected[30:]  # bit-identical, decay from step 75 on
    assert expected[74] == 3e-3 and expected[99] < 1e-4  # no re-warming, a full decay at the end


def test_moving_a_schedule_to_its_own_step_changes_no_rate() -> None:
    optimizer, scheduler = _plan(40)
    _rates_from(optimizer, scheduler, 35)  # inside the decay
    before = (optimizer.param_groups[0]["lr"], scheduler.get_last_lr())
    move_schedule_to(scheduler, 35)
    assert (optimizer.param_groups[0]["lr"], scheduler.get_last_lr()) == before
