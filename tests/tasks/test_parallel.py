"""The engine knobs change nothing but speed and memory: activation checkpointing gives the weights
of the plain run in every domain, keeps fewer activations and the same state-dict keys; FSDP2
(`parallel: fsdp`) on 2 gloo processes with half the batch each ends where 1 process ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_models.core.config import load_config
from ssl_models.core.distributed import World
from tasks.parallel import wrap_for_world
from tasks.paths import DomainPaths
from tasks.pretrain_data import StepBatches
from tests.conftest import (
    assert_close_weights,
    pretrained_state,
    run_stages,
    tiny_params,
    write_params,
)

SHORT = {"steps": 3, "checkpoint_every": 3, "warmup_steps": 0, "num_workers": 0}
# Recomputing a block runs the same float32 kernels on the same inputs, and the RNG state of the
# forward is restored for it (dropout draws the same masks): the weights are expected to be
# bit-identical; measured 0.0 in every domain. 1e-6 leaves room for a kernel choosing another
# summation order in backward, far below the 2 x lr (>= 2e-3) a wrong gradient moves a weight.
AC_ATOL = 1e-6


def legal_params() -> dict:
    # no labels: pretraining needs none, and the label checks of ingest need a bigger corpus
    return tiny_params(cpu_threads=1, labels=None, default_data={"max_files": 24}, model={"dropout": 0.0})


def audio_params() -> dict:
    from tests.ssl_models.test_audio_pipeline import audio_params as params

    return params(model={"dropout": 0.0})


def histo_params() -> dict:
    from tests.ssl_models.histo_files import histo_params as params

    return params()  # the ResNet: BatchNorm inside the checkpointed blocks


def medical_params() -> dict:
    from tests.ssl_models.medical_files import medical_params as params

    return params(cpu_threads=1, model={"backbone": "vit"})


def medical_corpus(root: Path) -> None:
    from tests.ssl_models.medical_files import blob_volume, write_nifti

    rng = np.random.default_rng(0)
    for i in range(8):
        write_nifti(root / "corpus" / f"v{i}.nii.gz", blob_volume(rng, 16, i % 2 == 0))


# domain: (params, stages making its shards, corpus writer, batch, the method under test)
DOMAINS: dict[str, tuple[Callable[[], dict], tuple[str, ...], Callable[[Path], None] | None, int, str]] = {
    "legal": (legal_params, ("default_data", "ingest", "preprocess"), None, 8, "mlm_span_contrastive"),
    "audio": (audio_params, ("default_data", "ingest", "preprocess"), None, 8, "tera"),
    "histo": (histo_params, ("default_data", "ingest", "preprocess"), None, 8, "simclr"),
    "medical": (medical_params, ("ingest", "preprocess"), medical_corpus, 4, "mae"),
}


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """`projects(domain)`: a folder with the domain's tiny shards, made on first use."""
    threads, made = torch.get_num_threads(), {}

    def project(domain: str) -> Path:
        if domain not in made:
            params, stages, corpus, _, _ = DOMAINS[domain]
            root = tmp_path_factory.mktemp(f"parallel-{domain}")
            if corpus is not None:
                corpus(root)
            write_params(root, params())
            run_stages(root, domain, *stages)
            made[domain] = root
        return made[domain]

    yield project
    torch.set_num_threads(threads)  # the stages set cpu_threads for the whole test process


@pytest.mark.slow
@pytest.mark.parametrize("domain", list(DOMAINS))
def test_activation_checkpointing_gives_the_weights_of_the_plain_run(projects: Callable[[str], Path],
                                                                     domain: str) -> None:
    """The real stage, 3 steps with and without it: the same saved encoder (same file keys: no
    `_checkpoint_wrapped_module.` prefix; same values, BatchNorm running statistics included)."""
    root, (_, _, _, batch, method) = projects(domain), DOMAINS[domain]
    plain = pretrained_state(root, domain, method=method, batch_size=batch, activation_checkpointing=False, **SHORT)
    checkpointed = pretrained_state(root, domain, method=method, batch_size=batch, activation_checkpointing=True,
                                    **SHORT)
    assert not any("_checkpoint_wrapped_module" in key for key in checkpointed[0])
    assert checkpointed[1]["loss"] == plain[1]["loss"]
    assert_close_weights(AC_ATOL, plain[0], checkpointed[0], f"{domain} {method} with activation checkpointing")
    running = [k for k in plain[0] if "running_mean" in k]
    assert domain != "histo" or running  # the ResNet's statistics were compared too


def built_method(root: Path, domain: str, checkpointing: bool) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    cfg, built = load_config(domain, root / "params.yaml")
    settings = replace(cfg.pretrain, activation_checkpointing=checkpointing, batch_size=8)
    torch.manual_seed(0)
    method = built.build_pretrain_method(cfg, DomainPaths(domain, root).shards)
    trained = wrap_for_world(method, settings, World(), torch.device("cpu"))
    method.train()
    return method, trained, StepBatches(built.pretrain_dataset(DomainPaths(domain, root).shards, "train"),
                                        method.data_side(), settings, World())


def saved_activation_bytes(trained: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes of the distinct tensors autograd keeps for backward (checkpointed
    blocks keep theirs to themselves: only their inputs stay, recomputed from in backward)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trained(batch)
    return loss, sum(storages.values())


def test_activation_checkpointing_keeps_fewer_activations_for_the_same_gradients(
        projects: Callable[[str], Path]) -> None:
    root = projects("legal")
    write_params(root, legal_params())
    runs = {}
    for checkpointing in (False, True):
        method, trained, batches = built_method(root, "legal", checkpointing)
        loss, kept = saved_activation_bytes(trained, batches[0][0])
        loss.backward()
        # parameters in the same order either way (named_parameters() of the method would show the
        # wrappers' prefix; its state_dict() does not)
        runs[checkpointing] = kept, [p.grad for p in method.parameters()]
    print(f"\nautograd keeps {runs[False][0]} bytes, {runs[True][0]} with activation checkpointing")
    assert runs[True][0] < 0.5 * runs[False][0]
    plain, checkpointed = runs[False][1], runs[True][1]
    assert len(plain) == len(checkpointed) and sum(g is not None for g in plain) > 10
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_checkpointed_blocks_keep_the_state_dict_keys_both_ways(projects: Callable[[str], Path]) -> None:
    """A checkpoint written with the option loads without it and back (strict): it is a speed and
    memory knob, resumable across."""
    root = projects("legal")
    write_params(root, legal_params())
    plain, _, _ = built_method(root, "legal", False)
    wrapped, _, _ = built_method(root, "legal", True)
    assert any("CheckpointWrapper" in type(m).__name__ for m in wrapped.modules())
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.add_(1.0)
    wrapped.load_state_dict(plain.state_dict())
    plain.load_state_dict(wrapped.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(wrapped.state_dict().values(), plain.state_dict().values()))


# FSDP2 on 2 gloo processes: each process holds half of every parameter and gathers the whole one
# for its forward and backward; gradients are reduce-scattered (summed in another order than one
# process' backward), so float32 rounding differs as under DDP: the tolerances of
# tests/ssl_models/test_legal_distributed.py (AdamW turns near-zero gradients that round
# differently into steps of a share of the learning rate; a wrong gradient moves weights by 2 lr).
FSDP_WEIGHT_ATOL, FSDP_LOSS_RTOL = 1e-4, 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method,checkpointing", [("mlm", False), ("mlm_span_contrastive", True)])
def test_fsdp_on_two_processes_ends_where_one_process_ends(projects: Callable[[str], Path], method: str,
                                                           checkpointing: bool) -> None:
    root = projects("legal")
    write_params(root, legal_params())
    settings = {**SHORT, "method": method, "batch_size": 8, "activation_checkpointing": checkpointing}
    single = pretrained_state(root, "legal", nproc=1, **settings)
    sharded = pretrained_state(root, "legal", nproc=2, parallel="fsdp", **settings)
    assert [step for step, _ in sharded[1]["loss"]] == [1, 2, 3]
    first, again = single[1]["loss"][0][1], sharded[1]["loss"][0][1]
    print(f"\nfsdp {method}: first loss {first:.6f} and {again:.6f}, relative difference "
          f"{abs(first - again) / first:.2e}")
    assert again == pytest.approx(first, rel=FSDP_LOSS_RTOL)
    assert_close_weights(FSDP_WEIGHT_ATOL, single[0], sharded[0], f"fsdp {method}")
