"""The data side of the 3D methods: views and masks are a function of the rows and their seeds
alone, survive pickling (loader workers), and do not depend on how the batch is split."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ssl_models.core.config import load_config
from ssl_models.core.modules import PretrainMethod, sample_seeds
from tests.conftest import write_params
from tests.ssl_models.medical_files import cube_rows, medical_params

METHODS = [("mae", "vit"), ("vit_inpainting_contrastive", "vit"), ("simclr", "resnet")]


def build(tmp_path: Path, method: str, backbone: str) -> PretrainMethod:
    write_params(tmp_path, medical_params(model={"backbone": backbone}, pretrain={"method": method}))
    cfg, domain = load_config("medical", tmp_path / "params.yaml")
    torch.manual_seed(0)
    return domain.build_pretrain_method(cfg, tmp_path)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, backbone", METHODS)
def test_a_batch_is_a_function_of_rows_and_seeds(method: str, backbone: str, tmp_path: Path) -> None:
    data_side = build(tmp_path, method, backbone).data_side()
    rows, seeds = cube_rows(6), sample_seeds(0, 0, range(6))
    batch = data_side(rows, seeds)
    torch.manual_seed(99)  # the global generator plays no part
    assert same(pickle.loads(pickle.dumps(data_side))(rows, seeds), batch)
    other = data_side(rows, sample_seeds(0, 1, range(6)))
    assert other.keys() == batch.keys()
    assert torch.equal(other["image"], batch["image"])  # the clean cubes; what is drawn differs
    assert all(not torch.equal(other[k], batch[k]) for k in batch if k != "image")
    halves = [data_side(rows[:2], seeds[:2]), data_side(rows[2:], seeds[2:])]
    assert same({k: torch.cat([h[k] for h in halves]) for k in batch}, batch)


@pytest.mark.parametrize("method, backbone", METHODS[1:])
def test_two_views_differ_from_each_other_and_from_the_volume(method: str, backbone: str, tmp_path: Path) -> None:
    batch = build(tmp_path, method, backbone).data_side()(cube_rows(4), sample_seeds(0, 0, range(4)))
    assert batch["view_1"].shape == batch["view_2"].shape == batch["image"].shape == (4, 1, 16, 16, 16)
    assert batch["view_1"].dtype == torch.float32
    for i in range(4):
        assert not torch.equal(batch["view_1"][i], batch["view_2"][i])
        assert not torch.equal(batch["view_1"][i], batch["image"][i])


def test_the_mae_masks_only_what_the_data_side_drew(tmp_path: Path) -> None:
    """The kept patches arrive in the batch: MONAI's own draw (torch.multinomial on the global
    generator) is replaced, so the loss is the same whatever that generator's state."""
    method = build(tmp_path, "mae", "vit").eval()
    batch = method.data_side()(cube_rows(4), sample_seeds(0, 0, range(4)))
    assert batch["kept"].shape == (4, 2)  # 8 patches in a 16-voxel cube of 8-voxel patches, 25% kept
    assert all(len(set(row.tolist())) == 2 for row in batch["kept"])
    with torch.no_grad():
        torch.manual_seed(1)
        first = method(batch)
        torch.manual_seed(2)
        assert torch.equal(method(batch), first)
        _, mask = method.mae(batch["image"].float(), batch["kept"])  # stored float16, widened as forward does
    assert mask.sum(dim=1).tolist() == [6] * 4
    assert all(mask[i, batch["kept"][i]].sum() == 0 for i in range(4))
