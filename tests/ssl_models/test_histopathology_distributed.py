"""Two training processes (gloo on this CPU, half of every step's global batch each) end where
one process with the whole batch does, for every histopathology SSL method; DataLoader workers
change nothing at all.

On the CPU each process' BatchNorm normalises its own half (PyTorch's SyncBatchNorm runs on CUDA
only; the loop converts to it on GPUs), so these runs use the ViT backbone and heads without
BatchNorm (`head_batch_norm: false`): the ResNet and the default heads are not equivalent across
world sizes on the CPU. BSS (a batch-level style swap) stays off, its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import pretrained_state, run_stages, write_params
from tests.ssl_models.histo_files import histo_params

pytestmark = pytest.mark.slow

VIT = {"backbone": "vit", "width": 8, "depth": 1, "patch_size": 8, "num_heads": 2}  # 16 patches of a 32 px tile
# 3 full-rate steps (no warmup) on a batch of 8, checkpointed at the end; batches built in the
# training process unless a test says otherwise
SHORT = {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "warmup_steps": 0, "rankme_samples": 8,
         "num_workers": 0}
NO_BN = {"head_batch_norm": False}
METHODS = {
    "simclr-ntxent": ("simclr", {"loss": "ntxent", **NO_BN}),
    "simclr-dcl": ("simclr", {"loss": "dcl", **NO_BN}),
    "vicreg": ("vicreg", NO_BN),
    # a fast teacher (momentum 0.5): its updates weigh on the loss within 3 steps
    "byol": ("byol", {"momentum": 0.5, **NO_BN}),
    "mae": ("mae", {}),
    "barlow_twins": ("barlow_twins", NO_BN),
    # a fast teacher (momentum 0.5 and up) and centre, and iBOT's masked patches: all weigh within 3 steps
    "dino": ("dino", {"momentum": 0.5, "momentum_steps": 3, "center_momentum": 0.5, "warmup_teacher_temp_steps": 2,
                      "ibot_weight": 0.5, "output_dim": 64, "crops": {"local_crops": 2}}),
}
# Weights the loss does not depend on at all have a gradient of pure float rounding noise, which
# Adam scales to steps of the learning rate's size, different in any two runs that sum in another
# order: they are left out of the comparison. In every ViT attention the key bias (the middle third
# of `qkv.bias`: q.b_k is the same for every key, and softmax ignores it); in VICReg the head's
# biases: its three terms are invariant to a shift of all embeddings, which the last bias is, and
# the first one too wherever a hidden unit is active on every sample (most are, in 3 steps).
LOSS_FREE = {method: {"head.layers.0.bias", "head.layers.2.bias"} for method in ("vicreg", "barlow_twins")}
# float32 rounding of a sum over 8 samples against two sums of 4 averaged by the all-reduce
WEIGHT_ATOL, LOSS_RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny histo shards, made once for the module."""
    root = tmp_path_factory.mktemp("histo-distributed")
    threads = torch.get_num_threads()
    write_params(root, histo_params(model=VIT))
    run_stages(root, "histo", "default_data", "ingest", "preprocess")
    yield root
    torch.set_num_threads(threads)  # cpu_threads set it for the stages


@pytest.fixture(scope="module")
def runs(project: Path) -> Any:
    """`runs(name, nproc=..., num_workers=...)`: (saved encoder tensors, log, the whole method's
    state from the last checkpoint: heads, BYOL's teacher) of method `name`, each run once."""
    done: dict[tuple, tuple[dict, dict, dict]] = {}

    def run(name: str, **settings: Any) -> tuple[dict, dict, dict]:
        key = (name, *sorted(settings.items()))
        if key not in done:
            method, options = METHODS[name]
            encoder, log = pretrained_state(project, "histo", method=method, options=options, **{**SHORT, **settings})
            checkpoint = torch.load(project / "models/histo/checkpoints/step_00000003.pt", weights_only=False)
            done[key] = encoder, log, checkpoint["model"]
        return done[key]

    return run


def loss_bound(name: str, tensor: torch.Tensor, method: str) -> torch.Tensor:
    """The part of a tensor the loss depends on (see LOSS_FREE)."""
    if name.split(":")[-1] in LOSS_FREE.get(method, set()):
        return tensor[:0]
    if name.endswith("attn.qkv.bias"):
        third = len(tensor) // 3
        return torch.cat([tensor[:third], tensor[2 * third:]])
    return tensor


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                   method: str | None = None) -> tuple[float, str]:
    """The largest absolute difference of the floating tensors of `a` and `b` (of their parts the
    loss depends on, given the method), and where."""
    assert a.keys() == b.keys()
    gaps = {}
    for k in (k for k in a if a[k].is_floating_point()):
        gap = a[k].double() - b[k].double()
        gap = gap if method is None else loss_bound(k, gap, method)
        gaps[k] = float(gap.abs().max()) if gap.numel() else 0.0
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_with_half_the_batch_each_end_where_one_process_does(runs: Any, name: str) -> None:
    one_encoder, one_log, one_state = runs(name, nproc=1)
    two_encoder, two_log, two_state = runs(name, nproc=2)
    first_one, first_two = one_log["loss"][0][1], two_log["loss"][0][1]
    (encoder_gap, _), (state_gap, where) = (max_difference(one_encoder, two_encoder, name),
                                            max_difference(one_state, two_state, name))
    print(f"\n{name}: first loss {first_one:.7f} vs {first_two:.7f} (|diff| {abs(first_one - first_two):.2e}), "
          f"max |weight diff| encoder {encoder_gap:.2e}, whole method {state_gap:.2e} ({where}); "
          f"all tensors {max_difference(one_state, two_state)}")
    assert [s for s, _ in one_log["loss"]] == [s for s, _ in two_log["loss"]] == [1, 2, 3]
    assert one_log["loss"][-1][1] != first_one  # the weights moved
    assert first_two == pytest.approx(first_one, rel=LOSS_RTOL)
    # the whole state: heads too, and BYOL's teacher, updated in each process from the averaged
    # online weights (rank 1's teacher shapes its half of the gradients, so the online weights
    # would drift were it not the same as rank 0's, which the checkpoint holds)
    assert encoder_gap <= WEIGHT_ATOL and state_gap <= WEIGHT_ATOL


def test_loader_workers_change_no_bit_of_the_weights(runs: Any) -> None:
    in_process, _, in_process_state = runs("simclr-ntxent", nproc=1)
    workers, _, workers_state = runs("simclr-ntxent", nproc=1, num_workers=2)
    assert all(torch.equal(in_process[k], workers[k]) for k in in_process)
    assert all(torch.equal(in_process_state[k], workers_state[k]) for k in in_process_state)
