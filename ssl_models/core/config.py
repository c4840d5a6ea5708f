"""Typed configuration for the stages, parsed from one domain block of params.yaml.

Every section is validated when a stage starts: an unknown key or a bad value fails in the
first second with the setting's name and the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ssl_models.core.errors import PipelineError
from ssl_models.core.privacy import PrivacyConfig

C = TypeVar("C")


def parse_section(cls: type[C], values: dict[str, Any] | None, where: str) -> C:
    """Build dataclass `cls` from a params.yaml mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipelineError(
            f"params.yaml {where}: unknown setting(s) {unknown}; valid settings: {sorted(known)}"
        )
    try:
        section = cls(**values)
    except TypeError as error:
        raise PipelineError(f"params.yaml {where}: {error}") from None
    check = getattr(section, "validate", None)
    if check is not None:
        check(where)
    return section


def require(condition: bool, where: str, message: str) -> None:
    """Fail with the setting's place in params.yaml unless `condition` holds (for `validate` methods)."""
    if not condition:
        raise PipelineError(f"params.yaml {where}: {message}")


_require = require


@dataclass
class SplitConfig:
    """Fractions of groups (or files) assigned to validation and test, by hash."""

    val: float = 0.1
    test: float = 0.2
    salt: str = "split-v1"

    def validate(self, where: str) -> None:
        _require(0 <= self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1,
                 where, f"split fractions val={self.val}, test={self.test} must be in [0, 1) and sum below 1")


@dataclass
class PretrainConfig:
    method: str = "mlm"
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    rankme_samples: int = 256
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific, e.g. mlm_probability

    def validate(self, where: str) -> None:
        _require(self.steps > 0 and self.batch_size > 0, where, "steps and batch_size must be positive")
        _require(self.schedule in ("cosine", "wsd", "constant"), where,
                 f"schedule {self.schedule!r} is not one of cosine, wsd, constant")
        _require(0 <= self.warmup_steps < self.steps, where, "warmup_steps must be below steps")
        _require(0 < self.decay_fraction <= 1, where, "decay_fraction must be in (0, 1]")
        _require(self.checkpoint_every > 0 and self.keep_checkpoints > 0, where,
                 "checkpoint_every and keep_checkpoints must be positive")


INITS = ("ssl", "scratch", "generic")
PROTOCOLS = ("linear", "knn", "finetune")


@dataclass
class FinetuneConfig:
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    inits: list[str] = field(default_factory=lambda: ["ssl", "scratch", "generic"])
    protocols: list[str] = field(default_factory=lambda: ["linear", "knn", "finetune"])
    steps: int = 40
    batch_size: int = 16
    learning_rate: float = 3e-4
    head_learning_rate: float = 1e-2
    knn_neighbors: int = 5
    linear_c: float = 1.0
    save_models: bool = True

    def validate(self, where: str) -> None:
        _require(all(0 < f <= 1 for f in self.label_fractions) and self.label_fractions, where,
                 "label_fractions must be in (0, 1]")
        _require(len(self.seeds) > 0, where, "seeds must list at least one seed")
        bad = [i for i in self.inits if i not in INITS]
        _require(not bad, where, f"inits {bad} not among {list(INITS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        _require(not bad, where, f"protocols {bad} not among {list(PROTOCOLS)}")
        _require(self.steps > 0 and self.batch_size > 0, where, "steps and batch_size must be positive")


@dataclass
class DomainConfig:
    """One domain block of params.yaml; domain-specific sections stay plain mappings
    until the domain module parses them into its own dataclasses."""

    name: str
    module: str
    corpus: Path
    labels: Path | None
    split: SplitConfig
    ingest: dict[str, Any]
    preprocess: dict[str, Any]
    model: dict[str, Any]
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    default_data: dict[str, Any]
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


DOMAIN_KEYS = {"module", "corpus", "labels", "split", "ingest", "preprocess", "model",
               "pretrain", "finetune", "default_data", "privacy"}


def load_params(params_path: Path = Path("params.yaml")) -> dict[str, Any]:
    if not params_path.exists():
        raise PipelineError(f"{params_path} not found; run from the project root")
    try:
        return yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PipelineError(f"{params_path} is not valid YAML: {error}") from None


def load_domain_config(domain: str, params_path: Path = Path("params.yaml")) -> DomainConfig:
    """Parse and validate the `domains.<domain>` block of params.yaml."""
    domains = load_params(params_path).get("domains") or {}
    if domain not in domains:
        raise PipelineError(f"params.yaml has no block domains.{domain}; blocks: {sorted(domains)}")
    block = domains[domain] or {}
    where = f"domains.{domain}"
    unknown = sorted(set(block) - DOMAIN_KEYS)
    if unknown:
        raise PipelineError(f"params.yaml {where}: unknown setting(s) {unknown}; valid: {sorted(DOMAIN_KEYS)}")
    for key in ("module", "corpus"):
        if not block.get(key):
            raise PipelineError(f"params.yaml {where}.{key} is required")
    labels = block.get("labels")
    return DomainConfig(
        name=domain,
        module=str(block["module"]),
        corpus=Path(block["corpus"]),
        labels=Path(labels) if labels else None,
        split=parse_section(SplitConfig, block.get("split"), f"{where}.split"),
        ingest=dict(block.get("ingest") or {}),
        preprocess=dict(block.get("preprocess") or {}),
        model=dict(block.get("model") or {}),
        pretrain=parse_section(PretrainConfig, block.get("pretrain"), f"{where}.pretrain"),
        finetune=parse_section(FinetuneConfig, block.get("finetune"), f"{where}.finetune"),
        default_data=dict(block.get("default_data") or {}),
        privacy=parse_section(PrivacyConfig, block.get("privacy"), f"{where}.privacy"),
    )
