"""finetune: each initialisation x label fraction x seed x protocol on the small labeled set.

Protocols: `linear` (probe), `knn`, `finetune` (the whole encoder) and, where each labeled
row is a bag of instances (slides of tiles), `abmil` (gated-attention MIL on the frozen instance
embeddings, `tasks.mil`), trained with the class weights and step rule of fine-tuning.

Initialisations: `ssl` (domain-pretrained), `scratch` (same architecture, random init),
`generic` (the off-the-shelf checkpoint, when configured; `finetune.generic_protocols`) and
`baseline` (the domain's classical features, when it ships them; linear probe only). The
subset for a (fraction, seed) is drawn by example, stratified by class, and is the same for
every initialisation, so the differences are paired. Test rows never change, and nothing is
chosen with them: the probe's C by cross-validation inside the subset
(`tasks.probes.fit_chosen_probe`), the fine-tune length by epochs with a cap (`finetune_steps`).
Fine-tuning starts from that probe's head (LP-FT), so it keeps what the probe found, or from a
fresh head (`finetune.head_init`; the generic checkpoint's by `generic_head_init`: fresh, as a
practitioner fine-tunes it with transformers or timm). Every
result row carries its test predictions, for the bootstrap intervals of evaluate.

A job is one (init, seed): it loads the encoder once, embeds once and runs every fraction that
uses its seed (fractions below `small_fraction` run more seeds) x protocol. The jobs are
independent: with `finetune.nproc > 1` they run in that many spawned worker processes, one
device each (GPU i, or a share of the CPU cores), and their results are merged in the serial
order, so results.json and the saved models are those of the serial run: bit for bit on the
CPU when a job gets as many torch threads in a worker as in the serial run (`cpu_threads` set
to at most cores / nproc; float sums split over another number of threads round differently,
which moves fine-tuned weights by ~1e-10). The probes run on one BLAS thread everywhere.

Beside results.json: embedding_2d.json (each init's frozen test features at the first seed,
in 2D) and checkpoint_choice.json (how well RankMe, which chose the pretrained encoder among
pretrain's candidates, tracked a linear probe on the pool's validation labels).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from safetensors.torch import save_file
from scipy import sparse
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ssl_models.core.config import DomainConfig, FinetuneConfig, section_params
from ssl_models.core.device import set_cpu_threads, training_device
from ssl_models.core.distributed import resolve_nproc
from ssl_models.core.domain import Domain
from ssl_models.core.errors import PipelineError
from ssl_models.core.modules import Encoder
from ssl_models.core.processes import available_cores
from ssl_models.core.shards import LABELED
from ssl_models.core.splits import select_label_subset
from tasks.io import atomic_dir, read_json, write_json
from tasks.lineage import LineageRecorder
from tasks.mil import abmil_probe, abmil_steps, embed_bags
from tasks.paths import DomainPaths
from tasks.probes import (
    ChosenC,
    embed_rows,
    finetune_encoder,
    finetune_steps,
    fit_chosen_probe,
    head_from_probe,
    knn_probe,
    probe_predictions,
    project_2d,
    scores,
)

log = logging.getLogger("finetune")

Rows = list[dict[str, Any]]
Features = tuple[Any, Any]  # (pool, test): numpy arrays, or scipy sparse matrices for a baseline
Bags = tuple[list[np.ndarray], list[np.ndarray]]  # (pool, test): each row's instance features [instances, dim]
Probe = tuple[ChosenC, Any]  # the chosen C and the fitted probe (None for a one-class subset)

# inits whose frozen features do not depend on the seed: embedded once per process
SEED_FREE_INITS = ("ssl", "generic", "baseline")
MIN_CANDIDATES = 3  # a rank correlation over fewer checkpoints says nothing


def load_labeled(shards: Path) -> tuple[Rows, Rows]:
    rows = load_from_disk(str(shards / LABELED)).to_list()
    pool = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    if not pool or not test:
        raise PipelineError(f"need labeled samples in both the training and the test split; have "
                            f"{len(pool)} and {len(test)}: add labels or raise split.test")
    return pool, test


def protocols_of(init: str, settings: FinetuneConfig) -> list[str]:
    """The protocols an init runs: the baseline is a linear probe on its features by design;
    generic runs `generic_protocols` (null: every protocol)."""
    if init == "baseline":
        return ["linear"]
    if init == "generic" and settings.generic_protocols is not None:
        return list(settings.generic_protocols)
    return list(settings.protocols)


def head_start(init: str, settings: FinetuneConfig) -> str:
    """Where an init's fine-tuning head starts: `probe` (LP-FT) or `fresh`; the generic
    checkpoint by `generic_head_init` when set. Started from its probe's head, MiniLM fine-tuned
    below its own linear probe (its L2-normalised features have per-dimension spreads of ~0.05,
    so the folded-in scaler makes the head's weights ~20x larger and small feature changes swing
    the logits); started fresh, as transformers' classifier classes start, it did not
    (BENCHMARKS.md, issue 20)."""
    if init == "generic" and settings.generic_head_init is not None:
        return settings.generic_head_init
    return settings.head_init


def job_seeds(settings: FinetuneConfig) -> list[int]:
    """Every seed some fraction runs with, in order of first use."""
    seeds: list[int] = []
    for fraction in settings.label_fractions:
        seeds += [seed for seed in settings.seeds_for(fraction) if seed not in seeds]
    return seeds


def fractions_of(settings: FinetuneConfig, seed: int) -> list[float]:
    """The fractions a job of `seed` runs: those whose seeds include it."""
    return [fraction for fraction in settings.label_fractions if seed in settings.seeds_for(fraction)]


@dataclass(frozen=True)
class Plan:
    """What every job shares (picklable: it travels to the worker processes)."""

    cfg: DomainConfig
    domain: Domain
    paths: DomainPaths
    classes: list[str]
    subsets: dict[tuple[float, int], list[int]]  # (fraction, seed) -> pool indices, the same for every init
    out: Path  # the stage's output folder being written (saved models go under it)
    first_seed: int  # each init's frozen test features at this seed go to embedding_2d.json


@dataclass
class Reuse:
    """What the jobs run by one process share: the frozen features of the inits that do not
    depend on the seed, and the probes fitted on identical subsets of them (every seed's 100%
    subset is the whole pool). Deterministic computations, so reuse changes no result."""

    features: dict[str, Features] = field(default_factory=dict)
    bags: dict[str, Bags] = field(default_factory=dict)  # for abmil
    probes: dict[tuple[str, tuple[int, ...]], Probe] = field(default_factory=dict)


@dataclass
class JobResult:
    results: list[dict[str, Any]]
    seconds: dict[str, float]
    embedding_2d: tuple[list[list[float]], str] | None = None  # (test rows in 2D, method) at the first seed


def finetune(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> list[dict[str, Any]]:
    domain_name = cfg.name
    settings = cfg.finetune
    set_cpu_threads(cfg.cpu_threads)
    pool, test = load_labeled(paths.shards)
    classes = sorted({r["label"] for r in pool} | {r["label"] for r in test})
    available = domain.available_inits(cfg)
    inits = [i for i in settings.inits if i in available]
    if skipped := [i for i in settings.inits if i not in available]:
        log.info("finetune %s: skipping init(s) %s (not offered here: no generic checkpoint configured, or "
                 "no baseline features in the domain package)", domain_name, skipped)
    seeds = job_seeds(settings)
    jobs = [(init, seed) for init in inits for seed in seeds]  # the serial order
    nproc = min(resolve_nproc(settings.nproc), len(jobs))
    device = training_device()
    log.info("finetune %s on %s, %d job(s) in %d process(es)", domain_name, device, len(jobs), nproc)
    recorder = LineageRecorder(f"finetune@{domain_name}", paths.finetune, seeds=seeds, root=paths.root,
                               params={"finetune": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards, paths.pretrain])
    # one subset per (fraction, seed), the same for every init: the runs are paired
    labels = [r["label"] for r in pool]
    subsets = {(fraction, seed): select_label_subset(labels, fraction, seed)
               for fraction in settings.label_fractions for seed in settings.seeds_for(fraction)}
    progress = tqdm(total=sum(len(fractions_of(settings, seed)) for _, seed in jobs),
                    desc=f"finetune {domain_name}", disable=None)
    with atomic_dir(paths.finetune) as out:
        plan = Plan(cfg, domain, paths, classes, subsets, out, seeds[0])
        if nproc == 1:
            reuse = Reuse()
            outcomes = [run_job(plan, init, seed, pool, test, device, reuse, progress) for init, seed in jobs]
        else:
            outcomes = run_in_processes(plan, jobs, nproc, device, progress)
        progress.close()
        results = [row for outcome in outcomes for row in outcome.results]
        seconds = {key: value for outcome in outcomes for key, value in outcome.seconds.items()}
        test_labels = [classes.index(r["label"]) for r in test]
        write_json(out / "results.json", {"classes": classes, "inits": inits, "test_labels": test_labels,
                                          "test_groups": [r.get("group") for r in test], "results": results})
        projections = {init: outcome.embedding_2d for (init, seed), outcome in zip(jobs, outcomes)
                       if outcome.embedding_2d is not None}
        write_json(out / "embedding_2d.json", {
            "labels": test_labels, "method": "pca", "seed": seeds[0],
            "methods": {init: method for init, (_, method) in projections.items()},  # truncated_svd: sparse features
            "inits": {init: points for init, (points, _) in projections.items()}})
        started = time.time()
        write_json(out / "checkpoint_choice.json", track_checkpoint_choice(plan, pool, device))
        seconds["checkpoint_choice"] = round(time.time() - started, 2)
        recorder.run_details["seconds_per_run"] = seconds  # in the run record only: timings vary
        recorder.run_details["processes"] = nproc
        recorder.write(out)
    log.info("finetune %s: %d results", domain_name, len(results))
    return results


def run_in_processes(plan: Plan, jobs: list[tuple[str, int]], nproc: int, device: torch.device,
                     progress: tqdm) -> list[JobResult]:
    """The jobs spread over `nproc` spawned workers, each on its own device (GPU i; on the CPU
    an equal share of the cores), returned in the order of `jobs`."""
    if device.type == "cuda":
        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(nproc)]
    else:
        devices = [str(device)] * nproc
    cores = available_cores()
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
    settings = plan.cfg.finetune
    try:
        with ProcessPoolExecutor(nproc, mp_context=context, initializer=_start_worker,
                                 initargs=(free_devices, threads, plan.paths.shards)) as executor:
            futures = {executor.submit(_run_in_worker, plan, init, seed): seed for init, seed in jobs}
            try:
                for finished in as_completed(futures):
                    finished.result()  # a failing job fails the stage now, not after the rest
                    progress.update(len(fractions_of(settings, futures[finished])))
            except BaseException:
                executor.shutdown(cancel_futures=True)
                raise
            return [future.result() for future in futures]
    except BrokenProcessPool as error:
        raise PipelineError(f"a fine-tuning worker process died ({error}), e.g. out of memory: "
                            f"lower finetune.nproc in params.yaml (1 runs the jobs in this process)") from None


# this worker process' device, labeled rows and reusable features/probes, set once by `_start_worker`
_worker: dict[str, Any] = {}


def _start_worker(free_devices: Any, threads: int, shards: Path) -> None:
    device = torch.device(free_devices.get())
    training_device()  # its backend settings (TF32 on GPUs) hold per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threadpool_limits(threads)  # BLAS and OpenMP of numpy and scikit-learn, as scikit-learn does it
    torch.set_num_threads(threads)
    _worker.update(device=device, labeled=load_labeled(shards), reuse=Reuse())


def _run_in_worker(plan: Plan, init: str, seed: int) -> JobResult:
    pool, test = _worker["labeled"]
    return run_job(plan, init, seed, pool, test, _worker["device"], _worker["reuse"])


def baseline_features(plan: Plan, pool: Rows, test: Rows) -> Features:
    """The domain's classical features of the pool and test rows, checked for shape."""
    pool_x, test_x = plan.domain.baseline_features(plan.cfg, pool, test)
    pool_x, test_x = [x if sparse.issparse(x) else np.asarray(x, dtype=np.float32) for x in (pool_x, test_x)]
    if pool_x.ndim != 2 or pool_x.shape[0] != len(pool) or test_x.shape != (len(test), pool_x.shape[1]):
        raise PipelineError(f"{plan.domain.baseline}.features returned shapes {pool_x.shape} and "
                            f"{test_x.shape} for {len(pool)} pool and {len(test)} test rows: it must give one "
                            f"row per sample, the same columns for both")
    return pool_x, test_x


def run_job(plan: Plan, init: str, seed: int, pool: Rows, test: Rows, device: torch.device,
            reuse: Reuse | None = None, progress: tqdm | None = None) -> JobResult:
    """Every fraction (that uses `seed`) x protocol of one (init, seed): the encoder loaded once
    (when needed), the pool and test rows embedded once per process for the seed-free inits,
    the ssl models of each fraction's first seed saved."""
    cfg, settings = plan.cfg, plan.cfg.finetune
    reuse = reuse if reuse is not None else Reuse()
    protocols = protocols_of(init, settings)
    test_y = [r["label"] for r in test]
    encoder: Encoder | None = None
    features = reuse.features.get(init) if init in SEED_FREE_INITS else None
    bags = reuse.bags.get(init) if init in SEED_FREE_INITS else None
    embed = features is None or ("abmil" in protocols and bags is None)
    if init != "baseline" and (embed or "finetune" in protocols):
        encoder = plan.domain.load_encoder(init, cfg, plan.paths.shards, plan.paths.pretrain / "encoder",
                                           seed).to(device)
    if embed:
        if init == "baseline":
            features = baseline_features(plan, pool, test)
        elif "abmil" in protocols:  # one pass gives both: the mean-pooled features and each tile's
            embedded, instances = embed_bags(encoder, pool + test, precision=settings.precision)
            features, bags = (embedded[:len(pool)], embedded[len(pool):]), (instances[:len(pool)],
                                                                            instances[len(pool):])
        else:
            embedded = embed_rows(encoder, pool + test, precision=settings.precision)
            features = embedded[:len(pool)], embedded[len(pool):]
        if init in SEED_FREE_INITS:
            reuse.features[init] = features
            if bags is not None:
                reuse.bags[init] = bags
    pool_x, test_x = features
    results: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for fraction in fractions_of(settings, seed):
        subset = plan.subsets[(fraction, seed)]
        train_x, train_y = pool_x[subset], [pool[i]["label"] for i in subset]
        base = {"init": init, "label_fraction": fraction, "seed": seed, "n_train": len(subset),
                "n_groups": len({pool[i].get("group") for i in subset}), "n_test": len(test)}
        probe: Probe | None = None
        for protocol in protocols:
            started = time.time()
            chosen: dict[str, Any] = {"linear_c": None, "linear_c_by": None, "steps": None}
            lp_ft = protocol == "finetune" and head_start(init, settings) == "probe"
            if protocol == "linear" or lp_ft:
                probe = probe or fitted_probe(reuse, init, subset, train_x, train_y, settings)
                if probe[1] is not None:  # a one-class subset fits no probe: no C applies
                    chosen.update(linear_c=probe[0].c, linear_c_by=probe[0].chosen_by)
            if protocol == "linear":
                predicted, probabilities = probe_predictions(probe[1], train_y, test_x, plan.classes)
            elif protocol == "knn":
                predicted, probabilities = knn_probe(train_x, train_y, test_x, settings.knn_neighbors, plan.classes)
            elif protocol == "finetune":
                chosen["steps"] = finetune_steps(settings, len(subset))
                chosen["head"] = "probe" if lp_ft else "fresh"
                # a fresh head (and a one-class subset's: it has no probe) is drawn from `seed`, not from
                # whatever ran before in this process, so every process order gives the same head
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    head = head_from_probe(probe[1] if lp_ft else None, encoder.dim, plan.classes)
                predicted, probabilities, model, head = finetune_encoder(
                    encoder, [pool[i] for i in subset], train_y, test, plan.classes, settings, seed, head)
                if settings.save_models and init == "ssl" and seed == settings.seeds_for(fraction)[0]:
                    _save_model(plan.out / "models" / f"{init}_fraction-{fraction}_seed-{seed}", model, head,
                                plan.classes)
            elif protocol == "abmil":
                chosen["steps"] = abmil_steps(settings, len(subset))
                predicted, probabilities = abmil_probe([bags[0][i] for i in subset], train_y, bags[1],
                                                       plan.classes, settings, seed, device)
            else:
                raise PipelineError(f"unknown protocol {protocol!r}: use linear, knn, finetune or abmil")
            results.append({**base, "protocol": protocol, **scores(test_y, predicted, probabilities, plan.classes),
                            "chosen": chosen, "predicted": [plan.classes.index(label) for label in predicted]})
            seconds[f"{init}/{protocol}/{fraction}/{seed}"] = round(time.time() - started, 2)
        if progress is not None:
            progress.update(1)
    embedding_2d = project_2d(test_x) if seed == plan.first_seed else None
    return JobResult(results, seconds, embedding_2d)


def fitted_probe(reuse: Reuse, init: str, subset: list[int], train_x: Any, train_y: list[str],
                 settings: FinetuneConfig) -> Probe:
    """The probe's C chosen inside the subset, and the probe fitted with it (shared by the
    linear protocol and the LP-FT head); reused for a seed-free init's identical subset."""
    key = (init, tuple(subset))
    if init in SEED_FREE_INITS and key in reuse.probes:
        return reuse.probes[key]
    probe = fit_chosen_probe(train_x, train_y, settings)
    if init in SEED_FREE_INITS:
        reuse.probes[key] = probe
    return probe


def _save_model(folder: Path, encoder: Any, head: Any, classes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    encoder, head = encoder.to("cpu"), head.to("cpu")
    encoder.save(folder / "encoder")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    write_json(folder / "classes.json", classes)


def candidate_folders(pretrain: Path) -> dict[int, Path]:
    """pretrain/candidates/step_XXXXXXXX/ by step."""
    folders = {}
    for folder in sorted((pretrain / "candidates").glob("step_*")):
        if folder.is_dir() and folder.name[len("step_"):].isdigit():
            folders[int(folder.name[len("step_"):])] = folder
    return folders


def track_checkpoint_choice(plan: Plan, pool: Rows, device: torch.device) -> dict[str, Any]:
    """How well the label-free choice among pretrain's candidate encoders tracked a linear probe
    on labels: each candidate embeds the pool once; a probe (C chosen as everywhere, inside the
    training rows) fits on the pool's train-split rows and is scored (macro-F1) on its val-split
    rows, never on test rows. Gives the Spearman correlation of RankMe with that score across
    candidates and the score the chosen step gained over the last one (null, with the note
    saying why, where there is nothing to measure)."""
    log_file = plan.paths.pretrain / "log.json"
    history = read_json(log_file) if log_file.exists() else {}
    logged = history.get("checkpoints", [])
    rankme = {point["step"]: point.get("rankme") for point in logged}
    folders = candidate_folders(plan.paths.pretrain)
    last_step = logged[-1]["step"] if logged else max(folders, default=None)
    choice = history.get("choice") or {"rule": "last", "step": last_step}
    record: dict[str, Any] = {
        "rule": choice.get("rule"), "chosen_step": choice.get("step"), "last_step": last_step,
        "metric": "macro_f1", "spearman": None, "gain_vs_last": None,
        "candidates": [{"step": step, "rankme": rankme.get(step), "val_score": None} for step in sorted(folders)]}
    notes = [] if "choice" in history else [
        f"pretrain/log.json {'records no choice' if history else 'is missing'}: taken to be the last checkpoint."]
    train = [r for r in pool if r["split"] == "train"]
    val = [r for r in pool if r["split"] == "val"]
    if len(folders) < MIN_CANDIDATES:
        notes.append(f"{len(folders)} candidate encoder(s) in pretrain/candidates/: a rank correlation needs at "
                     f"least {MIN_CANDIDATES} (raise pretrain.keep_candidates, or log checkpoints more often).")
    elif not val:
        notes.append("The labeled pool has no val-split rows to score the candidates on (test rows are never "
                     "used for this): raise split.val.")
    elif len({r["label"] for r in train}) < 2:
        notes.append("The labeled pool's train-split rows hold fewer than two classes: no probe to fit.")
    else:
        _score_candidates(plan, record, folders, train, val, device)
        notes.append(_summarise_tracking(record))
        log.info("finetune %s: RankMe vs val macro-F1 over %d candidates: Spearman %s, gain of the chosen step %s",
                 plan.cfg.name, len(folders), record["spearman"], record["gain_vs_last"])
    record["note"] = " ".join(notes)
    return record


def _score_candidates(plan: Plan, record: dict[str, Any], folders: dict[int, Path], train: Rows, val: Rows,
                      device: torch.device) -> None:
    """Each candidate's val macro-F1 into `record["candidates"]`; Spearman and gain from them."""
    settings = plan.cfg.finetune
    train_y, val_y = [r["label"] for r in train], [r["label"] for r in val]
    for candidate in record["candidates"]:
        encoder = plan.domain.load_encoder("ssl", plan.cfg, plan.paths.shards, folders[candidate["step"]],
                                           settings.seeds[0]).to(device)
        features = embed_rows(encoder, train + val, precision=settings.precision)
        del encoder
        train_x, val_x = features[:len(train)], features[len(train):]
        _, probe = fit_chosen_probe(train_x, train_y, settings)
        predicted, probabilities = probe_predictions(probe, train_y, val_x, plan.classes)
        candidate["val_score"] = scores(val_y, predicted, probabilities, plan.classes)["macro_f1"]
    paired = [(c["rankme"], c["val_score"]) for c in record["candidates"] if c["rankme"] is not None]
    if len(paired) >= MIN_CANDIDATES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: nan, reported in the note instead
            correlation = spearmanr(*zip(*paired)).statistic
        record["spearman"] = float(correlation) if np.isfinite(correlation) else None
    val_score = {c["step"]: c["val_score"] for c in record["candidates"]}
    if record["chosen_step"] in val_score and record["last_step"] in val_score:
        record["gain_vs_last"] = val_score[record["chosen_step"]] - val_score[record["last_step"]]


def _summarise_tracking(record: dict[str, Any]) -> str:
    """The note: what was measured, and why a figure is null."""
    sentences = [(f"Linear probe on the labeled pool's train-split rows, macro-F1 on its val-split rows, for "
                  f"{len(record['candidates'])} candidates.")]
    if record["spearman"] is None:
        sentences.append(f"No rank correlation: fewer than {MIN_CANDIDATES} candidates have a RankMe in "
                    f"pretrain/log.json, or RankMe or the val score is the same for all of them.")
    if record["gain_vs_last"] is None:
        sentences.append("No gain: the chosen or the last step has no candidate encoder.")
    return " ".join(sentences)
