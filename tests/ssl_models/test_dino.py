"""DINO's step bookkeeping (`ssl_models.core.dino`) and its multi-crop data sides, on real tiles and volumes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ssl_models.core.config import load_config
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import sample_seeds
from tests.conftest import write_params
from tests.ssl_models.medical_files import cube_rows, medical_params
from tests.ssl_models.test_histopathology_methods import histo_config, real_tile_rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def medical_method(tmp_path: Path, backbone: str, options: dict):
    write_params(tmp_path, medical_params(model={"backbone": backbone}, pretrain={"method": "dino", "options": options}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    return domain.build_pretrain_method(cfg, tmp_path)


def test_two_accumulation_rounds_of_half_a_batch_end_where_one_round_of_the_whole_batch_does(tmp_path: Path) -> None:
    """The teacher's EMA, the schedules and the centre move once per optimizer step, from the whole
    step's batch: lightly's per-call centre update would move the centre twice, from each half."""
    torch.manual_seed(0)
    cfg, domain = histo_config(tmp_path, "dino", "vit", {"momentum": 0.5, "center_momentum": 0.5,
                                                          "warmup_teacher_temp_steps": 3, "ibot_weight": 0.5})
    whole = domain.build_pretrain_method(cfg, tmp_path)
    halves = copy.deepcopy(whole)
    rows, data_side = real_tile_rows(8), whole.data_side()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (whole, halves)]
    for step in range(3):
        seeds = sample_seeds(0, step, range(8))
        whole(data_side(rows, seeds)).backward()
        for part in (slice(0, 4), slice(4, 8)):
            (halves(data_side(rows[part], seeds[part])) / 2).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert int(whole.steps_begun) == int(halves.steps_begun) == 3
    assert whole.teacher_temperature() == halves.teacher_temperature() == pytest.approx(0.04 + 2 / 3 * 0.03)
    assert float(whole.criterion.center.abs().max()) > 0  # the centre moved
    one, two = whole.state_dict(), halves.state_dict()
    # the pending sums (of the last step's teacher outputs, hundreds of them) to float32's relative rounding
    sums = [k for k in one if k.endswith("pending.total")]
    assert len(sums) == 2 and all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-5) for k in sums)
    gaps = {k: float((one[k].double() - two[k].double()).abs().max())
            for k in one if one[k].is_floating_point() and k not in sums}
    # AdamW divides by the root of tiny second moments, so float32 rounding of the two batchings can
    # reach a few 1e-5 on a bias (2e-5 seen in a full suite run); a centre moved twice differs by far more
    assert max(gaps.values()) < 1e-4, max(gaps, key=gaps.get)


def test_the_teacher_follows_the_student_once_per_step_and_a_loaded_state_resumes_the_schedule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg, domain = histo_config(tmp_path, "dino", "resnet", {"momentum": 0.5, "momentum_end": 0.5})
    method = domain.build_pretrain_method(cfg, tmp_path)
    rows, data_side = real_tile_rows(8), method.data_side()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    batch = data_side(rows, sample_seeds(0, 0, range(8)))
    method(batch).backward()
    optimizer.step()
    teacher = copy.deepcopy(method.teacher_head.state_dict())  # a deep copy after a forward works
    student = copy.deepcopy(method.head.state_dict())
    with torch.no_grad():
        method(batch)  # an evaluation without gradients changes nothing
    assert all(torch.equal(teacher[k], v) for k, v in method.teacher_head.state_dict().items())
    method(batch).backward()  # the next step begins: the teacher moves halfway to the student
    method(batch).backward()  # a second accumulation round of that step: it does not move again
    expected = {k: (teacher[k] + student[k]) / 2 for k in teacher if teacher[k].is_floating_point()}
    assert all(torch.allclose(method.teacher_head.state_dict()[k], v) for k, v in expected.items())
    resumed = domain.build_pretrain_method(cfg, tmp_path)
    resumed.load_state_dict(method.state_dict())
    assert int(resumed.steps_begun) == 2 and resumed._current_step() == method._current_step() == 1


@pytest.mark.parametrize("backbone, local_side", [("resnet", 16), ("vit", 32)])
def test_tile_crops_are_two_global_and_the_local_ones_and_a_slice_of_the_batch_is_the_batch_of_the_slice(
        tmp_path: Path, backbone: str, local_side: int) -> None:
    options = {"crops": {"local_crops": 3}, **({"ibot_weight": 1.0, "ibot_mask_ratio": 0.25} if backbone == "vit" else {})}
    cfg, domain = histo_config(tmp_path, "dino", backbone, options)
    data_side = domain.build_pretrain_method(cfg, tmp_path).data_side()
    rows, seeds = real_tile_rows(6), sample_seeds(3, 1, range(6))
    batch, part = data_side(rows, seeds), data_side(rows[2:4], seeds[2:4])
    assert batch["global_crops"].shape == (6, 2, 3, 32, 32)
    assert batch["local_crops"].shape == (6, 3, 3, local_side, local_side)
    assert not torch.equal(batch["global_crops"][:, 0], batch["global_crops"][:, 1])
    assert all(torch.equal(batch[k][2:4], part[k]) for k in batch)
    if backbone == "vit":  # 16 patches of 8 px (width 16: patch size 4 -> 64 patches), a quarter masked
        assert batch["masks"].shape[:2] == (6, 2) and (batch["masks"].sum(-1) == batch["masks"].shape[-1] // 4).all()


@pytest.mark.parametrize("backbone, local_side", [("resnet", 8), ("vit", 16)])
def test_sub_volume_crops_are_seeded_per_volume(tmp_path: Path, backbone: str, local_side: int) -> None:
    options = {"crops": {"local_crops": 2}, **({"ibot_weight": 1.0} if backbone == "vit" else {})}
    data_side = medical_method(tmp_path, backbone, options).data_side()
    rows, seeds = cube_rows(4), sample_seeds(0, 2, range(4))
    batch, part = data_side(rows, seeds), data_side(rows[1:3], seeds[1:3])
    assert batch["global_crops"].shape == (4, 2, 1, 16, 16, 16)
    assert batch["local_crops"].shape == (4, 2, 1, local_side, local_side, local_side)
    assert all(torch.equal(batch[k][1:3], part[k]) for k in batch)
    assert ("masks" in batch) == (backbone == "vit")


def test_ibot_on_a_resnet_is_one_clear_error(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "dino", "resnet", {"ibot_weight": 0.5})
    with pytest.raises(PipelineError, match="ibot_weight > 0 .* needs model.backbone: vit"):
        domain.build_pretrain_method(cfg, tmp_path)
    with pytest.raises(PipelineError, match="needs model.backbone: vit"):
        medical_method(tmp_path, "resnet", {"ibot_weight": 0.5})


def test_dino_declares_rankme_for_its_checkpoint_choice(tmp_path: Path) -> None:
    cfg, domain = histo_config(tmp_path, "dino", "resnet", {})
    assert type(domain.build_pretrain_method(cfg, tmp_path)).checkpoint_rule == "rankme"
    assert type(medical_method(tmp_path, "resnet", {})).checkpoint_rule == "rankme"


def test_the_teacher_momentum_reaches_its_end_at_the_run_s_last_step_unless_set(tmp_path: Path) -> None:
    """`momentum_steps: auto` (the default): the cosine from `momentum` to `momentum_end` spans the run's
    planned steps, as in the paper: from 0 to 1 over a 3-step run, the teacher is the student after
    step 1, moves halfway after step 2 and stays where it is after step 3 (with the old fixed 300
    steps it still moved). An explicit `momentum_steps` is kept."""
    import dataclasses

    cfg, domain = histo_config(tmp_path, "dino", "resnet", {"momentum": 0.0, "momentum_end": 1.0})
    cfg.pretrain = dataclasses.replace(cfg.pretrain, steps=3)  # what the pretrain stage planned
    method = domain.build_pretrain_method(cfg, tmp_path)
    assert method.options.momentum_steps == 3
    rows, data_side = real_tile_rows(8), method.data_side()
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
    batch = data_side(rows, sample_seeds(0, 0, range(8)))
    teachers = []
    for _ in range(4):  # each forward begins a step: the teacher follows the step before
        method(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        teachers.append({k: v.clone() for k, v in method.teacher_head.state_dict().items()})
    moved = [max(float((after[k] - before[k]).abs().max()) for k in after if after[k].is_floating_point())
             for before, after in zip(teachers, teachers[1:])]
    assert moved[0] > 0 and moved[1] > 0 and moved[2] == 0, moved
    cfg, domain = histo_config(tmp_path, "dino", "resnet", {"momentum_steps": 300})
    assert domain.build_pretrain_method(cfg, tmp_path).options.momentum_steps == 300
    with pytest.raises(PipelineError, match="momentum_steps.*auto"):
        histo_config(tmp_path, "dino", "resnet", {"momentum_steps": "soon"})
