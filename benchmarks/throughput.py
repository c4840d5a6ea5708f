"""Pretraining throughput per domain, for the default and the larger (`presets.large`) setting:
the loader alone, the training step alone, the whole loop, and how long the loop waits for data;
on a GPU also steps/s, the GPU / CPU ratio and model FLOP utilisation. Side by side in the same
run: the legal default's BERT MLM under Hugging Face's `Trainer`, and the histo default's SimCLR
in the plain loop of lightly's SimCLR example.

    python benchmarks/throughput.py [--domain legal --domain histo] [--steps 60] [--preset default|large|both]
                                    [--skip-baselines] [--workdir /tmp/throughput]
                                    [--steps-per-item auto|N] [--num-workers auto|N] [--cpu-threads N]

What runs is what the pretrain stage runs: `load_config`, the domain's `build_pretrain_method`, its
pretraining rows and data side, `tasks.pretrain_data.StepBatches` and `step_loader` with the configured
`num_workers` (`auto` through `resolve_workers`) and `steps_per_item` (items of several steps,
handed out one step at a time by `steps_of`), and the stage's own `tasks.parallel.Training`:
`wrap_for_world` (with `activation_checkpointing`), AdamW, the schedule and the step the loop calls
(autocast, `no_sync` on all but the last micro-batch under DDP, gradient clipping), with the loss
read back every `log_every` steps. Shards come from the real stages (`default_data`, `ingest`,
`preprocess`) in a temporary project on the default params (legal's corpus capped by
`default_data.max_files`, see `--legal-files`); the large preset's shards
from `ingest` + `preprocess` of the same corpus under `preset: large`, except where the default
corpus cannot give the preset's rows (histo: 224-pixel tiles from 64-pixel regions), where the
default tiles are resized in memory; the table's notes say which.

Measured, after `--warmup` steps that are not timed (worker start-up, allocator warm-up):

- loader alone: samples/s of `step_loader` iterated (through `steps_of`, one step at a time) with
  nothing else running;
- step alone: samples/s of the loop's step (forward, backward, clipping, AdamW, schedule, loss
  read back every `log_every` steps) on batches built beforehand and kept in memory (pinned
  for a GPU), cycling over at most 8 distinct batches;
- whole loop: samples/s of the loop as `tasks/stages/pretrain.py` runs it, batches from the DataLoader
  (checkpoints and RankMe, every `checkpoint_every` steps, are left out);
- data wait: the time the whole loop spends inside `next(iterator)` waiting for its next batch,
  over the loop's wall time, both over the timed steps (timed directly, not inferred).
  `loop/step` is the loop's rate over the step-alone rate (the median of the rounds' ratios, each
  round timing both back to back); `1 - loop/step` exceeds the data wait when the loader workers
  slow the step down by taking CPU cores from it;
- GFLOP/step: model FLOPs of one step (forward and backward, counted by
  `torch.utils.flop_counter.FlopCounterMode`); MFU (GPU): GFLOP/step x loop steps/s over the
  device's peak dense bf16 FLOP/s (`--peak-tflops` for a device not in `PEAK_BF16_TFLOPS`).

On the CPU the large presets run `--large-cpu-steps` steps at batch `--large-cpu-batch` (they are
meant for GPUs); on a GPU every preset runs at its configured batch (halved on out-of-memory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ssl_models.core import distributed  # noqa: E402
from ssl_models.core.config import DomainConfig, PretrainConfig, load_config  # noqa: E402
from ssl_models.core.device import autocast, set_cpu_threads, training_device  # noqa: E402
from ssl_models.core.processes import keep_freed_memory  # noqa: E402
from ssl_models.core.distributed import World  # noqa: E402
from ssl_models.core.domain import Domain  # noqa: E402
from ssl_models.core.offline import apply_offline_env  # noqa: E402
from tasks.checkpoints import seed_everything  # noqa: E402
from tasks.cli import run_stage  # noqa: E402
from tasks.parallel import Training  # noqa: E402
from tasks.paths import DomainPaths  # noqa: E402
from tasks.pretrain_data import (  # noqa: E402
    StepBatches,
    prefetch_factor,
    resolve_steps_per_item,
    step_loader,
    steps_of,
)

DOMAINS = ("legal", "audio", "histo", "medical")
TORCH_THREADS = torch.get_num_threads()  # before any domain's cpu_threads changes it
DISTINCT_BATCHES = 8  # step alone cycles over this many batches built beforehand
# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
                    ("RTX 4090", 165.2))


@dataclass
class Setup:
    """One domain at one preset: its parsed block, its pretraining rows and where they came from."""

    domain_name: str
    preset: str
    cfg: DomainConfig
    domain: Domain
    shards: Path
    rows: Sequence[dict[str, Any]]
    source: str


@dataclass
class Measurement:
    setup: Setup
    device: torch.device
    batch_size: int
    steps: int
    workers: int
    threads: int
    loader_rate: float  # samples/s
    step_rate: float  # samples/s
    loop_rate: float  # samples/s
    data_wait: float  # share of the loop's time spent in next(iterator)
    flops_per_step: float | None
    round_ratios: list[float]  # each round's loop rate / its step-alone rate
    note: str = ""

    @property
    def loop_over_step(self) -> float:
        return median(self.round_ratios)

    @property
    def loop_steps_per_s(self) -> float:
        return self.loop_rate / self.batch_size


# --- shards: the real stages in a temporary project ---------------------------------------------

def project_params(domains: Sequence[str], preset: str, corpus_root: Path | None, legal_files: int | None) -> dict:
    """The repository's blocks of `domains`, with `preset` chosen (null for the default); the large
    project reads the default project's corpus (`corpus_root`)."""
    blocks = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]
    selected = {}
    for name in domains:
        block = dict(blocks[name])
        block["preset"] = None if preset == "default" else preset
        if name == "legal":
            block["default_data"] = {**(block.get("default_data") or {}), "max_files": legal_files}
        if corpus_root is not None:
            for key in ("corpus", "labels"):
                if block.get(key):
                    block[key] = str(corpus_root / block[key])
        selected[name] = block
    return {"domains": selected}


def run_stages(domain_name: str, root: Path, stages: Sequence[str]) -> None:
    """The stages in order, each skipped when its output is already there (a `--workdir` re-used)."""
    paths = DomainPaths(domain_name, root)
    for stage in stages:
        if not paths.outputs(stage)[0].exists():
            started = time.perf_counter()
            run_stage(stage, domain_name, root)
            print(f"  {stage}@{domain_name} ({root.name}): {time.perf_counter() - started:.1f} s", flush=True)


def resized_tiles(rows: Sequence[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Tile rows (raw RGB bytes) resized to `size` pixels: in-memory rows of the large preset's shape."""
    from PIL import Image

    resized = []
    for row in rows:
        side = round((len(row["pixels"]) / 3) ** 0.5)
        image = Image.fromarray(np.frombuffer(row["pixels"], dtype=np.uint8).reshape(side, side, 3))
        resized.append({"pixels": np.asarray(image.resize((size, size), Image.BICUBIC)).tobytes()})
    return resized


class Projects:
    """The default project (corpus and shards) and the large one (shards of the same corpus)."""

    def __init__(self, workdir: Path, domains: Sequence[str], legal_files: int | None) -> None:
        self.default_root, self.large_root = workdir / "default", workdir / "large"
        for root, preset, corpus in ((self.default_root, "default", None), (self.large_root, "large",
                                                                              self.default_root)):
            root.mkdir(parents=True, exist_ok=True)
            (root / "params.yaml").write_text(yaml.safe_dump(project_params(domains, preset, corpus, legal_files),
                                                             sort_keys=False))
        self.setups: dict[tuple[str, str], Setup] = {}

    def setup(self, domain_name: str, preset: str) -> Setup:
        if (domain_name, preset) in self.setups:
            return self.setups[(domain_name, preset)]
        run_stages(domain_name, self.default_root, ("default_data", "ingest", "preprocess"))
        default_cfg, domain = load_config(domain_name, self.default_root / "params.yaml")
        shards = DomainPaths(domain_name, self.default_root).shards
        if preset == "default":
            rows = domain.pretrain_dataset(shards, "train")
            setup = Setup(domain_name, preset, default_cfg, domain, shards, rows,
                          f"{len(rows)} rows from the real stages")
        else:
            cfg, domain = load_config(domain_name, self.large_root / "params.yaml")
            if domain_name == "histo" and cfg.preprocess.stored_size > default_cfg.default_data.region_size:
                size = cfg.preprocess.stored_size
                rows = resized_tiles(domain.pretrain_dataset(shards, "train"), size)
                setup = Setup(domain_name, preset, cfg, domain, shards, rows,
                              f"{len(rows)} in-memory rows: the default {default_cfg.preprocess.stored_size}-px "
                              f"tiles resized to {size} px (the default {default_cfg.default_data.region_size}-px "
                              f"regions cannot give {size}-px tiles)")
            else:
                run_stages(domain_name, self.large_root, ("ingest", "preprocess"))
                shards = DomainPaths(domain_name, self.large_root).shards
                rows = domain.pretrain_dataset(shards, "train")
                setup = Setup(domain_name, preset, cfg, domain, shards, rows,
                              f"{len(rows)} rows from the real stages under the preset")
        if len(setup.rows) == 0:
            raise SystemExit(f"{domain_name} ({preset}): no pretraining rows")
        self.setups[(domain_name, preset)] = setup
        return setup


# --- the loop's pieces, as tasks/stages/pretrain.py runs them ------------------------------------

def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned(batch: Any) -> Any:
    """A batch in page-locked memory, as `step_loader` delivers it for a GPU."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {key: pinned(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(value) for value in batch)
    return batch


@dataclass
class Trainee:
    """The stage's training state for one measurement: its `Training` (the step the stage's loop
    calls) and the settings it was built from."""

    training: Training
    settings: PretrainConfig


def read_back(pending: list[torch.Tensor]) -> None:
    """The loop's one host sync: the pending step losses as numbers."""
    if pending:
        torch.stack(pending).tolist()
        pending.clear()


def build_trainee(setup: Setup, device: torch.device, batch_size: int, total_steps: int) -> Trainee:
    cfg = setup.cfg
    settings = replace(cfg.pretrain, batch_size=batch_size, steps=total_steps,
                       warmup_steps=min(cfg.pretrain.warmup_steps, total_steps - 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(TORCH_THREADS)
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(settings.seed)
    method = setup.domain.build_pretrain_method(cfg, setup.shards).to(device)
    training = Training.start(method, settings, World(), device)
    method.train()
    return Trainee(training, settings)


def count_flops(run: Callable[[], Any]) -> float | None:
    """Model FLOPs of `run()` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            run()
        return float(counter.get_total_flops())
    except Exception as error:  # an op the counter cannot trace: report no figure rather than fail
        print(f"  (FLOPs not counted: {type(error).__name__}: {error})")
        return None


def time_loader(dataset: StepBatches, workers: int, device: torch.device, warmup: int, steps: int) -> float:
    batches = steps_of(step_loader(dataset, 0, warmup + steps, workers, device))
    for _ in range(warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(steps):
        next(batches)
    seconds = time.perf_counter() - started
    del batches
    return steps * dataset.batch_size / seconds


def time_training(trainee: Trainee, next_batch: Callable[[int], list[dict[str, torch.Tensor]]], warmup: int,
                  steps: int) -> tuple[float, float]:
    """(samples/s, share of the time spent in `next_batch`) of `steps` timed steps after `warmup`
    untimed ones; the loss is read back every `log_every` steps, as the stage does."""
    pending: list[torch.Tensor] = []
    waited, started = 0.0, time.perf_counter()
    for step in range(1, warmup + steps + 1):
        asked = time.perf_counter()
        micro_batches = next_batch(step)
        if step > warmup:
            waited += time.perf_counter() - asked
        pending.append(trainee.training.step(micro_batches))
        if step % trainee.settings.log_every == 0:
            read_back(pending)
        if step == warmup:
            read_back(pending)
            synchronise(trainee.training.device)
            started = time.perf_counter()
    read_back(pending)
    synchronise(trainee.training.device)
    seconds = time.perf_counter() - started
    return steps * trainee.settings.batch_size / seconds, waited / seconds


def time_steps(trainee: Trainee, batches: list[list[dict[str, torch.Tensor]]], warmup: int, steps: int) -> float:
    """samples/s of the step alone, cycling over batches built beforehand."""
    return time_training(trainee, lambda step: batches[(step - 1) % len(batches)], warmup, steps)[0]


def time_loop(trainee: Trainee, dataset: StepBatches, workers: int, warmup: int, steps: int) -> tuple[float, float]:
    """(samples/s, share of the time spent waiting in next(iterator)) of the stage's loop. Its
    untimed steps also cover what the workers build ahead while they start (items in flight x
    steps per item), so that the timed steps see the loop's steady state."""
    steps_per_item = resolve_steps_per_item(dataset.steps_per_item, dataset.micro * dataset.rounds)
    ahead = workers * (prefetch_factor(steps_per_item, workers) or 0) * steps_per_item
    batches = steps_of(step_loader(dataset, 0, warmup + ahead + steps, workers, trainee.training.device))
    return time_training(trainee, lambda step: next(batches), warmup + ahead, steps)


def measure(setup: Setup, device: torch.device, batch_size: int, steps: int, warmup: int,
            repeats: int = 1) -> Measurement:
    """Loader alone, FLOPs of one step, then step alone and the whole loop taking turns `repeats`
    times, on one training state: rates are medians over the rounds, and loop / step the median
    of each round's ratio, its two phases run back to back in alternating order (step then loop,
    loop then step), so that a machine slowing down or speeding up hits both."""
    trainee = build_trainee(setup, device, batch_size, warmup + steps + 1)
    workers = distributed.resolve_workers(trainee.settings.num_workers, 1, device.type == "cuda")
    dataset = StepBatches(setup.rows, trainee.training.method.data_side(), trainee.settings, World())
    loader_rate = time_loader(dataset, workers, device, warmup, steps)
    distinct = [dataset[s] for s in range(min(steps, DISTINCT_BATCHES))]
    if device.type == "cuda":
        distinct = [pinned(batch) for batch in distinct]
    flops = count_flops(lambda: read_back([trainee.training.step(distinct[0])]))
    step_rates, loops = [], []
    phases = (lambda: step_rates.append(time_steps(trainee, distinct, warmup, steps)),
              lambda: loops.append(time_loop(trainee, dataset, workers, warmup, steps)))
    for round_ in range(repeats):
        for phase in phases[::-1] if round_ % 2 else phases:
            phase()
    loop_rate, data_wait = (median(values) for values in zip(*loops))
    return Measurement(setup, device, batch_size, steps, workers, torch.get_num_threads(), loader_rate,
                       median(step_rates), loop_rate, data_wait, flops,
                       [loop / step for (loop, _), step in zip(loops, step_rates)])


def measure_on_gpu(setup: Setup, device: torch.device, steps: int, warmup: int, repeats: int) -> Measurement:
    """At the preset's batch; halved until it fits the device's memory."""
    batch_size = setup.cfg.pretrain.batch_size
    while True:
        try:
            result = measure(setup, device, batch_size, steps, warmup, repeats)
            if batch_size != setup.cfg.pretrain.batch_size:
                result.note = f"batch {setup.cfg.pretrain.batch_size} ran out of memory"
            return result
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
        batch_size //= 2
        gc.collect()  # the failed attempt's model and batches, outside the except block's traceback
        torch.cuda.empty_cache()


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# --- side by side: Hugging Face Trainer and lightly's example loop -------------------------------

def trainer_steps_per_s(setup: Setup, device: torch.device, steps: int, warmup: int, workers: int,
                        workdir: Path) -> tuple[float, float | None]:
    """The legal default's BERT (the same BertConfig: vocabulary, sizes) under transformers'
    Trainer with DataCollatorForLanguageModeling on the same packed blocks, at the same batch,
    learning rate, schedule, weight decay, clipping, MLM probability and loader workers; steps/s
    after `warmup` steps, and the FLOPs of one step."""
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cfg, settings = setup.cfg, setup.cfg.pretrain
    torch.use_deterministic_algorithms(False)  # Trainer's default (full_determinism off)
    torch.set_num_threads(TORCH_THREADS)
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(setup.shards / "tokenizer")
    model = BertForMaskedLM(setup.domain.build_encoder(cfg, setup.shards).model.config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=settings.options.mlm_probability)
    total = warmup + steps
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, total):
                synchronise(device)
                marks[state.global_step] = time.perf_counter()

    arguments = TrainingArguments(
        output_dir=str(workdir / "trainer"), max_steps=total, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=min(settings.warmup_steps, total - 1), max_grad_norm=1.0, logging_steps=settings.log_every,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=settings.seed,
        dataloader_num_workers=workers, dataloader_prefetch_factor=4 if workers else None,
        dataloader_pin_memory=device.type == "cuda", use_cpu=device.type == "cpu", bf16=device.type == "cuda",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch")  # as the stage's AdamW
    trainer = Trainer(model=model, args=arguments, train_dataset=setup.rows, data_collator=collator,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # logs still run every log_every steps (a loss .item() each)
    trainer.train()
    one_batch = {k: v.to(device) for k, v in collator([setup.rows[i] for i in range(settings.batch_size)]).items()}
    with autocast(device, settings.precision):
        flops = count_flops(lambda: trainer.model(**one_batch).loss.backward())
    return steps / (marks[total] - marks[warmup]), flops


class TileImages(torch.utils.data.Dataset):
    """Pretraining tiles as PIL images through a lightly transform: (views, 0), as a torchvision
    dataset with `transform=SimCLRTransform(...)` gives in lightly's example."""

    def __init__(self, rows: Sequence[dict[str, Any]], transform: Callable) -> None:
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        pixels = self.rows[index]["pixels"]
        side = round((len(pixels) / 3) ** 0.5)
        return self.transform(Image.fromarray(np.frombuffer(pixels, dtype=np.uint8).reshape(side, side, 3))), 0


def lightly_example_steps_per_s(setup: Setup, device: torch.device, steps: int, warmup: int, workers: int,
                                persistent_workers: bool = False) -> tuple[float, float, int]:
    """The histo default's SimCLR (the method's own backbone, projection head and DCL/NT-Xent loss,
    the same batch and tile size) in the loop of lightly's SimCLR example: SimCLRTransform on
    the tiles, a shuffling DataLoader over epochs, SGD(lr=0.06), no clipping or schedule.
    Returns (steps/s, data-wait share, steps per epoch) after `warmup` steps; the wait includes
    starting each epoch's workers (`persistent_workers=True`, not in the example, keeps them)."""
    from lightly.transforms import SimCLRTransform

    cfg, settings = setup.cfg, setup.cfg.pretrain
    augment = settings.options.augment
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(TORCH_THREADS)
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(settings.seed)
    method = setup.domain.build_pretrain_method(cfg, setup.shards).to(device)
    backbone, head, criterion = method.backbone, method.head, method.criterion
    # lightly's recipe (its colour jitter and grey scale for natural images), with the histo
    # default's crop scale, flips, 90-degree turns and blur
    transform = SimCLRTransform(input_size=cfg.preprocess.stored_size, min_scale=augment.crop_scale,
                                hf_prob=0.5 if augment.flip else 0.0, vf_prob=0.5 if augment.flip else 0.0,
                                rr_prob=0.5 if augment.rotate90 else 0.0, gaussian_blur=augment.blur_probability,
                                sigmas=(augment.blur_sigma, augment.blur_sigma))
    dataloader = torch.utils.data.DataLoader(TileImages(setup.rows, transform), batch_size=settings.batch_size,
                                             shuffle=True, drop_last=True, num_workers=workers,
                                             persistent_workers=persistent_workers and workers > 0)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.06)
    backbone.train()
    head.train()
    step, waited, started, total = 0, 0.0, time.perf_counter(), warmup + steps
    while step < total:  # the example's `for epoch in range(...): for batch in dataloader:`
        total_loss = torch.zeros((), device=device)
        asked = time.perf_counter()
        batches = iter(dataloader)  # starts the epoch's workers: waiting for data too
        if step >= warmup:
            waited += time.perf_counter() - asked
        while step < total:
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            if step >= warmup:
                waited += time.perf_counter() - asked
            x0, x1 = batch[0]
            x0, x1 = x0.to(device), x1.to(device)
            loss = criterion(head(backbone(x0)), head(backbone(x1)))
            total_loss += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == warmup:
                synchronise(device)
                started = time.perf_counter()
        float(total_loss)  # the example prints the epoch's loss
    synchronise(device)
    seconds = time.perf_counter() - started
    return steps / seconds, waited / seconds, len(dataloader)


def mlm_variant(setup: Setup) -> Setup:
    """The legal block with plain `mlm` (the objective Trainer's collator and BertForMaskedLM train)."""
    options = setup.domain.methods.options("mlm")(mlm_probability=setup.cfg.pretrain.options.mlm_probability)
    cfg = replace(setup.cfg, pretrain=replace(setup.cfg.pretrain, method="mlm", options=options))
    return replace(setup, cfg=cfg)


# --- output --------------------------------------------------------------------------------------

HEADER = (f"{'domain':<8}{'preset':<8}{'device':<7}{'batch':>6}{'steps':>6}{'wkrs':>5}{'thr':>4}"
          f"{'loader/s':>10}{'step/s':>9}{'loop/s':>9}{'steps/s':>9}{'loop/step':>10}{'wait':>7}"
          f"{'GFLOP/step':>11}{'GFLOP/s':>9}{'MFU':>7}")


def row(m: Measurement, peak: float | None) -> str:
    gflop = m.flops_per_step / 1e9 if m.flops_per_step else None
    achieved = gflop * m.loop_steps_per_s if gflop else None
    mfu = (f"{achieved * 1e9 / peak:>7.1%}" if m.device.type == "cuda" and achieved and peak
           else f"{'n/a':>7}" if m.device.type == "cuda" else f"{'-':>7}")
    return (f"{m.setup.domain_name:<8}{m.setup.preset:<8}{m.device.type:<7}{m.batch_size:>6}{m.steps:>6}"
            f"{m.workers:>5}{m.threads:>4}{m.loader_rate:>10.4g}{m.step_rate:>9.4g}{m.loop_rate:>9.4g}"
            f"{m.loop_steps_per_s:>9.3g}{m.loop_over_step:>10.2f}{m.data_wait:>7.1%}"
            + (f"{gflop:>11.4g}{achieved:>9.4g}" if gflop else f"{'?':>11}{'?':>9}") + mfu)


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", action="append", choices=DOMAINS, help="repeatable; default: all four")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement (default presets)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of step alone and whole loop, taking turns; medians are printed")
    parser.add_argument("--preset", choices=("default", "large", "both"), default="both")
    parser.add_argument("--skip-baselines", action="store_true", help="no Trainer / lightly comparison")
    parser.add_argument("--large-cpu-batch", type=int, default=4, help="batch of the large presets on the CPU")
    parser.add_argument("--large-cpu-steps", type=int, default=3, help="timed steps of the large presets on the CPU")
    parser.add_argument("--legal-files", type=int, default=800,
                        help="default_data.max_files of the legal corpus (0: all ~2,300 texts)")
    parser.add_argument("--steps-per-item", default=None,
                        help="pretrain.steps_per_item for every measurement (auto or a number; default: params)")
    parser.add_argument("--num-workers", default=None,
                        help="pretrain.num_workers for every measurement (auto or a number; default: params)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="domains.<d>.cpu_threads (training threads) for every measurement (default: params)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (the stage calls keep_freed_memory; for an A/B run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s, for MFU")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the projects and shards here and re-use them (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    apply_offline_env()
    if not args.default_malloc:
        keep_freed_memory()  # as the pretrain stage does; process-wide, so the baselines run with it too
    domains = args.domain or list(DOMAINS)
    presets = ("default", "large") if args.preset == "both" else (args.preset,)
    os.environ["SSL_PIPELINE_DEVICE"] = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = training_device() if torch.cuda.is_available() else None  # the stage's device (and its TF32 settings)
    peak = peak_flops(gpu, args.peak_tflops) if gpu is not None else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads by default; "
          + (f"GPU {torch.cuda.get_device_name(gpu)} (peak bf16 "
             + (f"{peak / 1e12:.0f} TFLOP/s)" if peak else "unknown: pass --peak-tflops)") if gpu else "no GPU"))
    print(f"load average before: {load_average()}", flush=True)
    needed = set(domains) | (set() if args.skip_baselines else {"legal", "histo"})
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="throughput-")))
        projects = Projects(workdir, sorted(needed), args.legal_files or None)
        results: list[Measurement] = []
        for name in domains:
            for preset in presets:
                setup = with_loader_settings(projects.setup(name, preset), args)
                large = preset != "default"
                cpu_batch = args.large_cpu_batch if large else setup.cfg.pretrain.batch_size
                cpu_steps, warmup = (args.large_cpu_steps, 1) if large else (args.steps, args.warmup)
                print(f"{name} {preset}: {setup.source}", flush=True)
                runs = [measure(setup, torch.device("cpu"), cpu_batch, cpu_steps, warmup, 1 if large else args.repeats)]
                if gpu is not None:
                    runs.append(measure_on_gpu(setup, gpu, args.steps, args.warmup, args.repeats))
                for m in runs:
                    print("  " + row(m, peak), flush=True)
                results.extend(runs)
        print()
        print(HEADER)
        for m in results:
            print(row(m, peak))
        print("samples/s: loader alone, step alone, whole loop; wait: share of the loop's time in next(iterator)")
        notes = {(m.setup.domain_name, m.setup.preset): m.setup.source for m in results}
        for (name, preset), source in notes.items():
            print(f"  {name} {preset}: {source}")
        for m in results:
            if m.note:
                print(f"  {m.setup.domain_name} {m.setup.preset} {m.device.type}: {m.note}")
        if gpu is not None:
            print("GPU / CPU, loop samples/s (large presets: the GPU at the preset's batch, the CPU at "
                  f"{args.large_cpu_batch}):")
            for cpu_run, gpu_run in zip(results[::2], results[1::2]):
                print(f"  {cpu_run.setup.domain_name} {cpu_run.setup.preset}: "
                      f"{gpu_run.loop_rate / cpu_run.loop_rate:.1f}x")
        defaults = [m for m in results if m.setup.preset == "default" and m.device.type == "cpu"]
        if defaults:
            print("CPU defaults, loop >= 0.95 x step alone and data wait < 5%:")
            for m in defaults:
                verdict = "yes" if m.loop_over_step >= 0.95 and m.data_wait < 0.05 else "no"
                print(f"  {m.setup.domain_name}: {verdict} (loop/step {m.loop_over_step:.2f}, rounds "
                      + " ".join(f"{r:.2f}" for r in m.round_ratios)
                      + f"; wait {m.data_wait:.1%}, {m.workers} worker(s), {m.threads} training thread(s))")
        if not args.skip_baselines:
            baselines(projects, workdir, args, gpu)
    print(f"load average after: {load_average()}")


def with_loader_settings(setup: Setup, args: argparse.Namespace) -> Setup:
    """`setup` with `--steps-per-item` / `--num-workers` / `--cpu-threads` in place of the block's."""
    changes = {key: value if value == "auto" else int(value)
               for key, value in (("steps_per_item", args.steps_per_item), ("num_workers", args.num_workers))
               if value is not None}
    cfg = setup.cfg if args.cpu_threads is None else replace(setup.cfg, cpu_threads=args.cpu_threads)
    if changes:
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, **changes))
    return setup if cfg is setup.cfg else replace(setup, cfg=cfg)


def median(values: Sequence[float]) -> float:
    return float(np.median(values))


def gflop(flops: float | None) -> str:
    return f"{flops / 1e9:.2f} GFLOP/step" if flops else "FLOPs not counted"


def baselines(projects: Projects, workdir: Path, args: argparse.Namespace, gpu: torch.device | None) -> None:
    """Our loop and the other framework's taking turns `--repeats` times on each device; medians."""
    devices = [torch.device("cpu")] + ([gpu] if gpu is not None else [])
    legal, histo = projects.setup("legal", "default"), projects.setup("histo", "default")
    try:
        import accelerate  # noqa: F401  transformers' Trainer needs it
    except ImportError:
        with_trainer = False
        print("HF Trainer skipped: transformers' Trainer needs accelerate (pinned in requirements.lock, not a "
              "dependency in pyproject.toml: pip install accelerate==1.15.0)")
    else:
        with_trainer = True
    settings = legal.cfg.pretrain
    print()
    print(f"legal default BERT MLM ({legal.cfg.model.num_layers} x {legal.cfg.model.hidden_size}, vocabulary "
          f"{len(legal.domain.build_encoder(legal.cfg, legal.shards).tokenizer)}), batch {settings.batch_size} x "
          f"{legal.cfg.preprocess.block_size} tokens, lr {settings.learning_rate}, mlm_probability "
          f"{settings.options.mlm_probability}, {args.steps} timed steps, {args.repeats} rounds:")
    for device in devices:
        default = measure(legal, device, settings.batch_size, args.steps, args.warmup)
        ours, trainer = [], []
        for _ in range(args.repeats):
            ours.append(measure(mlm_variant(legal), device, settings.batch_size, args.steps, args.warmup))
            if with_trainer:
                trainer.append(trainer_steps_per_s(legal, device, args.steps, args.warmup, ours[-1].workers, workdir))
        ours_rate = median([m.loop_steps_per_s for m in ours])
        print(f"  {device.type}: our loop, default mlm_span_contrastive: {default.loop_steps_per_s:.2f} steps/s "
              f"({gflop(default.flops_per_step)}); our loop, plain mlm: {ours_rate:.2f} steps/s "
              f"({gflop(ours[0].flops_per_step)}, wait {median([m.data_wait for m in ours]):.1%}; rounds "
              + " ".join(f"{m.loop_steps_per_s:.2f}" for m in ours) + ")")
        if trainer:
            trainer_rate = median([rate for rate, _ in trainer])
            print(f"  {device.type}: HF Trainer + DataCollatorForLanguageModeling: {trainer_rate:.2f} steps/s "
                  f"({gflop(trainer[0][1])}; rounds " + " ".join(f"{rate:.2f}" for rate, _ in trainer)
                  + f"); ours (mlm) / Trainer: {ours_rate / trainer_rate:.2f}x")
    settings = histo.cfg.pretrain
    print(f"histo default SimCLR ({histo.cfg.model.backbone} width {histo.cfg.model.width}, {settings.options.loss}, "
          f"T={settings.options.temperature}), batch {settings.batch_size} x {histo.cfg.preprocess.stored_size}-px "
          f"tiles, {len(histo.rows)} tiles, {args.steps} timed steps, {args.repeats} rounds:")
    for device in devices:
        ours, example, persistent = [], [], []
        for _ in range(args.repeats):
            ours.append(measure(histo, device, settings.batch_size, args.steps, args.warmup))
            example.append(lightly_example_steps_per_s(histo, device, args.steps, args.warmup, ours[-1].workers))
            persistent.append(lightly_example_steps_per_s(histo, device, args.steps, args.warmup, ours[-1].workers,
                                                          persistent_workers=True))
        ours_rate, example_rate = median([m.loop_steps_per_s for m in ours]), median([e[0] for e in example])
        print(f"  {device.type}: our loop: {ours_rate:.2f} steps/s (wait {median([m.data_wait for m in ours]):.1%}; "
              "rounds " + " ".join(f"{m.loop_steps_per_s:.2f}" for m in ours) + f"); lightly's example loop: "
              f"{example_rate:.2f} steps/s (wait {median([e[1] for e in example]):.1%}, {example[0][2]} steps per "
              "epoch, its workers restarted each epoch; rounds " + " ".join(f"{e[0]:.2f}" for e in example)
              + f"); ours / lightly: {ours_rate / example_rate:.2f}x")
        print(f"  {device.type}: lightly's example loop with persistent_workers=True: "
              f"{median([e[0] for e in persistent]):.2f} steps/s (wait {median([e[1] for e in persistent]):.1%})")


if __name__ == "__main__":
    main()
