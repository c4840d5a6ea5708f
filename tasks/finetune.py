"""finetune: each initialisation x label fraction x seed x protocol on the small labeled set.

Fine-tuning starts from the linear probe's head (LP-FT), so it keeps what the probe found.
Initialisations: `ssl` (domain-pretrained), `scratch` (same architecture, random init) and
`generic` (the base checkpoint, when configured). The subset for a (fraction, seed) is the
same for every initialisation, and every fine-tune gets the same number of steps, so the
differences are paired and the comparison fair. Test rows never change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from safetensors.torch import save_file
from tqdm import tqdm

from ssl_models.core.config import DomainConfig, FinetuneConfig, section_params
from ssl_models.core.device import set_cpu_threads, training_device
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


def load_labeled(shards: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = load_from_disk(str(shards / "labeled")).to_list()
    pool = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    if not pool or not test:
        raise PipelineError(f"need labeled samples in both the training and the test split; have "
                            f"{len(pool)} and {len(test)}: add labels or raise split.test")
    return pool, test


def finetune(cfg: DomainConfig, domain: Domain, paths: DomainPaths) -> list[dict[str, Any]]:
    domain_name = cfg.name
    settings = cfg.finetune
    set_cpu_threads(cfg.cpu_threads)
    pool, test = load_labeled(paths.shards)
    classes = sorted({r["label"] for r in pool} | {r["label"] for r in test})
    test_y = [r["label"] for r in test]
    available = domain.available_inits(cfg)
    inits = [i for i in settings.inits if i in available]
    if skipped := [i for i in settings.inits if i not in available]:
        log.info("finetune %s: skipping init(s) %s (not configured: e.g. no model.base_checkpoint)",
                 domain_name, skipped)
    device = training_device()
    log.info("finetune %s on %s", domain_name, device)
    recorder = LineageRecorder(f"finetune@{domain_name}", paths.finetune, seeds=list(settings.seeds), root=paths.root,
                               params={"finetune": asdict(settings), "model": section_params(cfg.model)},
                               upstream=[paths.shards, paths.pretrain])
    # one subset per (fraction, seed), the same object for every init: the runs are paired
    subsets = {(fraction, seed): select_label_subset([r["label"] for r in pool], [r["group"] for r in pool],
                                                     fraction, seed)
               for fraction in settings.label_fractions for seed in settings.seeds}
    results: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}  # in the run record only: timings differ from run to run
    runs = len(inits) * len(settings.seeds) * len(settings.label_fractions)
    progress = tqdm(total=runs, desc=f"finetune {domain_name}", disable=None)
    with atomic_dir(paths.finetune) as out:
        for init in inits:
            cached: np.ndarray | None = None
            for seed in settings.seeds:
                encoder = domain.load_encoder(init, cfg, paths.shards, paths.pretrain / "encoder", seed).to(device)
                # ssl and generic encoders do not depend on the seed: embed once
                features = cached if cached is not None else embed_rows(encoder, pool + test)
                cached = features if init != "scratch" else None
                for fraction in settings.label_fractions:
                    subset = subsets[(fraction, seed)]
                    base = {"init": init, "label_fraction": fraction, "seed": seed,
                            "n_train": len(subset), "n_test": len(test)}
                    for protocol in settings.protocols:
                        started = time.time()
                        predicted, probabilities, trained = run_protocol(
                            protocol, encoder, features, pool, test, subset, classes, settings, seed)
                        if trained and settings.save_models and init == "ssl" and seed == settings.seeds[0]:
                            _save_model(out / "models" / f"{init}_fraction-{fraction}_seed-{seed}", *trained, classes)
                        results.append({**base, "protocol": protocol,
                                        **scores(test_y, predicted, probabilities, classes)})
                        seconds[f"{init}/{protocol}/{fraction}/{seed}"] = round(time.time() - started, 2)
                    progress.update(1)
        progress.close()
        write_json(out / "results.json", {"classes": classes, "inits": inits, "results": results})
        recorder.run_details["seconds_per_run"] = seconds
        recorder.write(out)
    log.info("finetune %s: %d results", domain_name, len(results))
    return results


def run_protocol(protocol: str, encoder: Encoder, features: np.ndarray, pool: list[dict[str, Any]],
                 test: list[dict[str, Any]], subset: list[int], classes: list[str], settings: FinetuneConfig,
                 seed: int) -> tuple[list[str], np.ndarray, tuple[Encoder, torch.nn.Linear] | None]:
    """Test predictions and class probabilities of one protocol trained on `subset` of the pool
    (features: pool then test), and the fine-tuned modules when the protocol trains the encoder."""
    train_y = [pool[i]["label"] for i in subset]
    test_features = features[len(pool):]
    if protocol == "linear":
        return *linear_probe(features[subset], train_y, test_features, settings.linear_c, seed, classes), None
    if protocol == "knn":
        return *knn_probe(features[subset], train_y, test_features, settings.knn_neighbors, classes), None
    probe = fit_linear_probe(features[subset], train_y, settings.linear_c, seed)
    predicted, probabilities, model, head = finetune_encoder(
        encoder, [pool[i] for i in subset], train_y, test, classes, settings, seed,
        head_from_probe(probe, encoder.dim, classes))
    return predicted, probabilities, (model, head)


def _save_model(folder: Path, encoder: Any, head: Any, classes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    encoder, head = encoder.to("cpu"), head.to("cpu")
    encoder.save(folder / "encoder")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    write_json(folder / "classes.json", classes)
