"""finetune: each initialisation x label fraction x seed x protocol on the small labeled set.

Fine-tuning starts from the linear probe's head (LP-FT), so it keeps what the probe found.
Initialisations: `ssl` (domain-pretrained), `scratch` (same architecture, random init) and
`generic` (the base checkpoint, when configured). The subset for a (fraction, seed) is the
same for every initialisation, and every fine-tune gets the same number of steps, so the
differences are paired and the comparison fair. Test rows never change.

A job is one (init, seed): it loads the encoder once, embeds once and runs every fraction x
protocol. The jobs are independent: with `finetune.nproc > 1` they run in that many spawned
worker processes, one device each (GPU i, or a share of the CPU cores), and their results are
merged in the serial order, so results.json and the saved models are those of the serial run:
bit for bit on the CPU when a job gets as many torch threads in a worker as in the serial run
(`cpu_threads` set to at most cores / nproc; float sums split over another number of threads
round differently, which moves fine-tuned weights by ~1e-10).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ssl_models.core.config import DomainConfig, FinetuneConfig, section_params
from ssl_models.core.device import set_cpu_threads, training_device
from ssl_models.core.distributed import resolve_nproc
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.core.splits import select_label_subset
from tasks.io import atomic_dir, write_json
from tasks.lineage import LineageRecorder
from tasks.paths import DomainPaths
from tasks.probes import (
    embed_rows,
    finetune_encoder,
    fit_linear_probe,
    head_from_probe,
    knn_probe,
    linear_probe,
    scores,
)

log = logging.getLogger("finetune")

Rows = list[dict[str, Any]]


def load_labeled(shards: Path) -> tuple[Rows, Rows]:
    rows = load_from_disk(str(shards / "labeled")).to_list()
    pool = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    if not pool or not test:
        raise PipelineError(f"need labeled samples in both the training and the test split; have "
                            f"{len(pool)} and {len(test)}: add labels or raise split.test")
    return pool, test


@dataclass(frozen=True)
class Plan:
    """What every job shares (picklable: it travels to the worker processes)."""

    cfg: DomainConfig
    domain: Domain
    paths: DomainPaths
    classes: list[str]
    subsets: dict[tuple[float, int], list[int]]  # (fraction, seed) -> pool indices, the same for every init
    out: Path  # the stage's output folder being written (saved models go under it)


@dataclass
class JobResult:
    results: list[dict[str, Any]]
    seconds: dict[str, float]
    features: np.ndarray | None = None  # frozen features of pool + test (the serial run reuses them)


def finetune(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> list[dict[str, Any]]:
    domain_name = cfg.name
    settings = cfg.finetune
    set_cpu_threads(cfg.cpu_threads)
    pool, test = load_labeled(paths.shards)
    classes = sorted({r["label"] for r in pool} | {r["label"] for r in test})
    available = domain.available_inits(cfg)
    inits = [i for i in settings.inits if i in available]
    if skipped := [i for i in settings.inits if i not in available]:
        log.info("finetune %s: skipping init(s) %s (not configured: e.g. no model.base_checkpoint)",
                 domain_name, skipped)
    jobs = [(init, seed) for init in inits for seed in settings.seeds]  # the serial order
    nproc = min(resolve_nproc(settings.nproc), len(jobs))
    device = training_device()
    log.info("finetune %s on %s, %d job(s) in %d process(es)", domain_name, device, len(jobs), nproc)
    recorder = LineageRecorder(f"finetune@{domain_name}", paths.finetune, seeds=list(settings.seeds), root=paths.root,
                               params={"finetune": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards, paths.pretrain])
    # one subset per (fraction, seed), the same for every init: the runs are paired
    subsets = {(fraction, seed): select_label_subset([r["label"] for r in pool], [r["group"] for r in pool],
                                                     fraction, seed)
               for fraction in settings.label_fractions for seed in settings.seeds}
    progress = tqdm(total=len(jobs) * len(settings.label_fractions), desc=f"finetune {domain_name}", disable=None)
    with atomic_dir(paths.finetune) as out:
        plan = Plan(cfg, domain, paths, classes, subsets, out)
        if nproc == 1:
            outcomes = run_serially(plan, jobs, pool, test, device, progress)
        else:
            outcomes = run_in_processes(plan, jobs, nproc, device, progress)
        progress.close()
        results = [row for outcome in outcomes for row in outcome.results]
        seconds = {key: value for outcome in outcomes for key, value in outcome.seconds.items()}
        write_json(out / "results.json", {"classes": classes, "inits": inits, "results": results})
        recorder.run_details["seconds_per_run"] = seconds  # in the run record only: timings vary
        recorder.run_details["processes"] = nproc
        recorder.write(out)
    log.info("finetune %s: %d results", domain_name, len(results))
    return results


def run_serially(plan: Plan, jobs: list[tuple[str, int]], pool: Rows, test: Rows, device: torch.device,
                 progress: tqdm) -> list[JobResult]:
    """The jobs one after the other in this process; ssl and generic encoders do not depend on
    the seed, so their features are embedded once per init."""
    outcomes: list[JobResult] = []
    features: dict[str, np.ndarray] = {}
    for init, seed in jobs:
        outcome = run_job(plan, init, seed, pool, test, device, features.get(init), progress)
        if init != "scratch":
            features[init] = outcome.features
        outcomes.append(outcome)
    return outcomes


def run_in_processes(plan: Plan, jobs: list[tuple[str, int]], nproc: int, device: torch.device,
                     progress: tqdm) -> list[JobResult]:
    """The jobs spread over `nproc` spawned workers, each on its own device (GPU i; on the CPU
    an equal share of the cores), returned in the order of `jobs`."""
    if device.type == "cuda":
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(nproc)]
    else:
        devices = [str(device)] * nproc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // nproc)  # workers x threads <= cores: oversubscribed threads wait on each other
    if plan.cfg.cpu_threads:
        threads = min(threads, plan.cfg.cpu_threads)
    if device.type == "cpu" and threads != torch.get_num_threads():
        log.info("finetune %s: %d torch thread(s) per worker, %d in a serial run: fine-tuned weights differ "
                 "from the serial run's in float rounding (set domains.%s.cpu_threads to %d for bit-identical "
                 "ones)", plan.cfg.name, threads, torch.get_num_threads(), plan.cfg.name, threads)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into a worker
    free_devices = context.Queue()
    for name in devices:
        free_devices.put(name)
    fractions = len(plan.cfg.finetune.label_fractions)
    try:
        with ProcessPoolExecutor(nproc, mp_context=context, initializer=_start_worker,
                                 initargs=(free_devices, threads, plan.paths.shards)) as executor:
            futures = [executor.submit(_run_in_worker, plan, init, seed) for init, seed in jobs]
            try:
                for finished in as_completed(futures):
                    finished.result()  # a failing job fails the stage now, not after the rest
                    progress.update(fractions)
            except BaseException:
                executor.shutdown(cancel_futures=True)
                raise
            return [future.result() for future in futures]
    except BrokenProcessPool as error:
        raise PipelineError(f"a fine-tuning worker process died ({error}), e.g. out of memory: "
                            f"lower finetune.nproc in params.yaml (1 runs the jobs in this process)") from None


# this worker process' device and labeled rows, set once by `_start_worker`
_worker: dict[str, Any] = {}


def _start_worker(free_devices: Any, threads: int, shards: Path) -> None:
    device = torch.device(free_devices.get())
    training_device()  # its backend settings (TF32 on GPUs) hold per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threadpool_limits(threads)  # BLAS and OpenMP of numpy and scikit-learn, as scikit-learn does it
    torch.set_num_threads(threads)
    _worker.update(device=device, labeled=load_labeled(shards))


def _run_in_worker(plan: Plan, init: str, seed: int) -> JobResult:
    pool, test = _worker["labeled"]
    outcome = run_job(plan, init, seed, pool, test, _worker["device"])
    outcome.features = None  # the parent does not need them back
    return outcome


def run_job(plan: Plan, init: str, seed: int, pool: Rows, test: Rows, device: torch.device,
            features: np.ndarray | None = None, progress: tqdm | None = None) -> JobResult:
    """Every fraction x protocol of one (init, seed): the encoder loaded once, the pool and test
    rows embedded once (unless `features` are given), the ssl models of the first seed saved."""
    cfg, settings = plan.cfg, plan.cfg.finetune
    test_y = [r["label"] for r in test]
    encoder = plan.domain.load_encoder(init, cfg, plan.paths.shards, plan.paths.pretrain / "encoder",
                                       seed).to(device)
    if features is None:
        features = embed_rows(encoder, pool + test, precision=settings.precision)
    results: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for fraction in settings.label_fractions:
        subset = plan.subsets[(fraction, seed)]
        base = {"init": init, "label_fraction": fraction, "seed": seed, "n_train": len(subset), "n_test": len(test)}
        for protocol in settings.protocols:
            started = time.time()
            predicted, probabilities, trained = run_protocol(
                protocol, encoder, features, pool, test, subset, plan.classes, settings, seed)
            if trained and settings.save_models and init == "ssl" and seed == settings.seeds[0]:
                _save_model(plan.out / "models" / f"{init}_fraction-{fraction}_seed-{seed}", *trained, plan.classes)
            results.append({**base, "protocol": protocol, **scores(test_y, predicted, probabilities, plan.classes)})
            seconds[f"{init}/{protocol}/{fraction}/{seed}"] = round(time.time() - started, 2)
        if progress is not None:
            progress.update(1)
    return JobResult(results, seconds, features)


def run_protocol(protocol: str, encoder: Encoder, features: np.ndarray, pool: Rows, test: Rows, subset: list[int],
                 classes: list[str], settings: FinetuneConfig,
                 seed: int) -> tuple[list[str], np.ndarray, tuple[Encoder, torch.nn.Linear] | None]:
    """Test predictions and class probabilities of one protocol trained on `subset` of the pool
    (features: pool then test), and the fine-tuned modules when the protocol trains the encoder."""
    train_y = [pool[i]["label"] for i in subset]
    test_features = features[len(pool):]
    c = settings.linear_c if settings.linear_c != "cv" else 0.1  # TODO(finetune helper): cross-validated
    if protocol == "linear":
        return *linear_probe(features[subset], train_y, test_features, c, seed, classes), None
    if protocol == "knn":
        return *knn_probe(features[subset], train_y, test_features, settings.knn_neighbors, classes), None
    probe = fit_linear_probe(features[subset], train_y, c, seed)
    # a one-class subset has no probe and keeps the head's random init: draw it from `seed`, not
    # from whatever ran before in this process, so every process order gives the same head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = head_from_probe(probe, encoder.dim, classes)
    predicted, probabilities, model, head = finetune_encoder(
        encoder, [pool[i] for i in subset], train_y, test, classes, settings, seed, head)
    return predicted, probabilities, (model, head)


def _save_model(folder: Path, encoder: Any, head: Any, classes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    encoder, head = encoder.to("cpu"), head.to("cpu")
    encoder.save(folder / "encoder")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    write_json(folder / "classes.json", classes)
