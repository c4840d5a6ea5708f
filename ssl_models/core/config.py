"""Typed configuration: one domain block of params.yaml parsed once, every section validated.

`load_config` turns `domains.<name>` into a `DomainConfig` whose sections are the dataclasses
the domain declares (`Domain.sections`) and whose `pretrain.options` is the chosen method's own
options dataclass. The block (with its chosen preset) is validated in one pass by pydantic, in
strict mode, then each section's own `validate`: any unknown key, wrong type or out-of-range value
fails when any stage starts, in one line naming the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import yaml
from pydantic import TypeAdapter, ValidationError

from ssl_models.core.errors import PipelineError
from ssl_models.core.privacy import PrivacyConfig

if TYPE_CHECKING:
    from ssl_models.core.domain import Domain

C = TypeVar("C")


def require(condition: bool, where: str, message: str) -> None:
    """Fail with the setting's place in params.yaml unless `condition` holds (for `validate` methods)."""
    if not condition:
        raise PipelineError(f"params.yaml {where}: {message}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def validated(annotation: Any, value: Any, where: str) -> Any:
    """`value` from params.yaml checked against `annotation` by pydantic (mappings become the
    dataclasses they are typed as), then each dataclass's own `validate(where)`, innermost first.

    Strict: "5" is no number and 1 no boolean; an int passes for a float. Unknown keys, wrong
    types and values out of range fail as one line naming their place under `where`."""
    # YAML's .nan and .inf are floats pydantic accepts: a NaN learning rate would pass here and
    # stop training an hour later (a NaN loss, a LinAlgError in RankMe); no setting means one
    refuse_non_finite(value, where)
    # pydantic's strict mode builds a dataclass from a mapping only in JSON input: YAML's values
    # travel as JSON (they are JSON's, but for YAML timestamps and binaries, read as their text)
    text = json.dumps(value, default=str)
    try:
        result = _adapter(annotation).validate_json(text, strict=True, extra="forbid")
    except ValidationError as error:
        raise PipelineError(_one_line(error, annotation, json.loads(text), where)) from None
    _check_sections(result, where)
    return result


def _non_finite(value: Any, where: str) -> tuple[str, float] | None:
    """The first place under `where` holding NaN or an infinity, with the value; None when none does."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = (value.items() if isinstance(value, dict)
             else ((f"[{index}]", item) for index, item in enumerate(value)) if isinstance(value, (list, tuple))
             else ())
    for key, item in items:
        found = _non_finite(item, f"{where}{key}" if isinstance(value, (list, tuple)) else f"{where}.{key}")
        if found is not None:
            return found
    return None


def refuse_non_finite(value: Any, where: str) -> None:
    """One line naming the first NaN or infinity in `value` (as params.yaml spells it), if any."""
    found = _non_finite(value, where)
    if found is not None:
        place, number = found
        spelled = ".nan" if math.isnan(number) else ".inf" if number > 0 else "-.inf"
        raise PipelineError(f"params.yaml {place}: {spelled} is not a finite number")


def _check_sections(value: Any, where: str) -> None:
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_sections(item, f"{where}[{index}]")
    elif dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            _check_sections(getattr(value, item.name), f"{where}.{item.name}")
        check = getattr(value, "validate", None)
        if check is not None:
            check(where)


# pydantic words these for JSON input; params.yaml says list, mapping, true and false
_EXPECTED = {"list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping of settings",
             "bool_type": "true or false"}


def _one_line(error: ValidationError, annotation: Any, data: Any, where: str) -> str:
    """pydantic's errors as one line: each place in params.yaml, the value there and what is valid."""
    unknown: dict[str, tuple[list[str], list[str]]] = {}  # place -> (valid settings, unknown keys)
    wrong: dict[str, tuple[Any, Any, list[str]]] = {}  # place -> (value, declared type, what is valid)
    required: list[str] = []
    for item in error.errors(include_url=False):
        if item["type"] in ("unexpected_keyword_argument", "extra_forbidden", "missing"):
            place, section, _ = _locate(annotation, data, item["loc"][:-1], where)
            if item["type"] == "missing":
                required.append(f"{place}.{item['loc'][-1]} is required")
                continue
            valid = sorted(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else []
            unknown.setdefault(place, (valid, []))[1].append(str(item["loc"][-1]))
        else:
            place, declared, value = _locate(annotation, data, item["loc"], where)
            expected = _EXPECTED.get(item["type"]) or item["msg"].removeprefix("Input should be ")
            wrong.setdefault(place, (value, declared, []))[2].append(expected)
    lines = [f"{place}: unknown setting(s) {sorted(keys)}; valid settings: {valid}"
             for place, (valid, keys) in unknown.items()] + required
    for place, (value, declared, expected) in wrong.items():
        if type(None) in typing.get_args(declared):
            expected.append("null")
        lines.append(f"{place}: {value!r} should be {' or '.join(dict.fromkeys(expected))}")
    return "params.yaml " + "; ".join(lines)


def _locate(annotation: Any, data: Any, loc: Any, where: str) -> tuple[str, Any, Any]:
    """The place in params.yaml a pydantic error location names, the type declared there and the
    value found there (a union member's tag in the location is no place)."""
    place, declared, value = where, annotation, data
    for part in loc:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            continue
        declared = _declared_inside(declared, part)
        place += f"[{part}]" if isinstance(part, int) else f".{part}"
    return place, declared, value


def _declared_inside(declared: Any, part: str | int) -> Any:
    """The type declared for `part` of a value of type `declared` (a setting, or an item)."""
    members = [m for m in typing.get_args(declared) if m is not type(None)]
    if typing.get_origin(declared) in (Union, types.UnionType) and len(members) == 1:
        declared = members[0]  # `X | None` holding a value: X
    if dataclasses.is_dataclass(declared):
        return _hints(declared).get(str(part), Any)
    if typing.get_origin(declared) in (list, dict) and typing.get_args(declared):
        return typing.get_args(declared)[-1]
    return Any


def parse_section(cls: type[C], values: dict[str, Any] | None, where: str) -> C:
    """Build dataclass `cls` from a params.yaml mapping (null: its defaults), checked as `validated` does."""
    return validated(cls, {} if values is None else values, where)


@dataclass
class SplitConfig:
    """Fractions of groups (or files) assigned to validation and test, by hash."""

    val: float = 0.1
    test: float = 0.2
    salt: str = "split-v1"

    def validate(self, where: str) -> None:
        require(0 <= self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1,
                where, f"split fractions val={self.val}, test={self.test} must be in [0, 1) and sum below 1")


@dataclass
class ParallelWork:
    """How a data stage (ingest, preprocess) spreads its per-file work (tasks/workers.py): never
    what it makes, so its output is byte-identical for any of these settings, and they are left
    out of its lineage record."""

    workers: int | Literal["auto"] = "auto"  # local processes; auto: this machine's cores; 1: in the stage's process
    # a Dask scheduler address (tcp://host:8786) to run the work on that cluster instead; null: the
    # environment's DASK_SCHEDULER_ADDRESS when set, else the local `workers`
    scheduler: str | None = None
    # sources a task carries, committed together (a killed run resumes at a chunk); auto: about four
    # chunks per worker, at most 64 sources each
    chunk_size: int | Literal["auto"] = "auto"

    def validate(self, where: str) -> None:
        require(self.workers == "auto" or self.workers >= 1, f"{where}.workers", "must be auto or at least 1")
        require(self.chunk_size == "auto" or self.chunk_size >= 1, f"{where}.chunk_size", "must be auto or at least 1")
        require(self.scheduler is None or "://" in self.scheduler or ":" in self.scheduler, f"{where}.scheduler",
                "must be a Dask scheduler address such as tcp://10.0.0.5:8786")


@dataclass
class IngestLimits(ParallelWork):
    """Settings every domain's `ingest:` block shares (its own dataclass inherits them)."""

    # a larger share of the corpus' files quarantined stops the run at ingest: the corpus or the
    # reader settings are wrong, and training on the rest would be silently training on a sample
    max_quarantined_fraction: float = 0.25
    # a corpus symlink whose target lies outside the corpus folder is read only when true (ingest then
    # logs how many it followed); false: quarantined as "symlink leaving the corpus"
    follow_symlinks: bool = False

    def validate(self, where: str) -> None:
        super().validate(where)
        require(0 <= self.max_quarantined_fraction <= 1, f"{where}.max_quarantined_fraction",
                "must be a fraction in [0, 1]")


SEED_LIMIT = 2**32  # numpy's generators take seeds in [0, 2**32)


@dataclass
class PretrainConfig:
    method: str | None = None  # a name from the domain's method registry; null: the domain's `default_method`
    steps: int = 300  # the run's optimizer steps; with `epochs`, their cap
    # passes over the pretraining train split's rows (blocks, tiles, crops) that size the run:
    # min(steps, ceil(epochs x train rows / batch_size)) steps (`for_corpus`); null: `steps` alone
    epochs: float | None = None
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    rankme_samples: int = 256
    seed: int = 0
    # how the run is spread; none of these changes the result beyond float rounding (`batch_size`
    # is the global batch: per-process batch x nproc x grad_accumulation)
    nproc: int | Literal["auto"] = "auto"  # processes on this node; auto: one per visible GPU, 1 on CPU
    num_workers: int | Literal["auto"] = "auto"  # DataLoader workers building batches; 0: the main process
    grad_accumulation: int = 1  # micro-batches per optimizer step in each process
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 `fully_shard`, for backbones too big for one GPU
    compile: bool = False  # torch.compile the method
    log_every: int = 10  # steps between loss read-backs (the loop syncs with the device only then)
    activation_checkpointing: bool = False  # recompute the backbone's blocks in backward: less memory, ~1/3 more compute
    steps_per_item: int | Literal["auto"] = "auto"  # steps a loader item carries (amortises the worker hand-over)
    # which logged checkpoint becomes the encoder: rankme (label-free, Garrido et al. 2023) for
    # joint-embedding methods, last for reconstruction ones (MAE, MLM, TERA); auto picks by method
    checkpoint_choice: Literal["auto", "rankme", "last"] = "auto"
    keep_candidates: int = 10  # logged checkpoints' encoders kept for that choice (and its tracking figures)
    # the method's own options dataclass once parsed (its masking ratio, temperature...); a mapping in params.yaml
    options: Any = field(default_factory=dict)

    def validate(self, where: str) -> None:
        require(self.steps > 0 and self.batch_size > 0, where, "steps and batch_size must be positive")
        require(self.epochs is None or self.epochs > 0, f"{where}.epochs", "must be null or positive")
        require(0 <= self.warmup_steps < self.steps, where, "warmup_steps must be below steps")
        require(0 < self.decay_fraction <= 1, where, "decay_fraction must be in (0, 1]")
        require(self.checkpoint_every > 0 and self.keep_checkpoints > 0, where,
                "checkpoint_every and keep_checkpoints must be positive")
        require(self.rankme_samples > 1, where, "rankme_samples must be at least 2")
        require(self.learning_rate > 0 and self.weight_decay >= 0, where,
                "learning_rate must be positive and weight_decay >= 0")
        require(self.keep_candidates >= 1, f"{where}.keep_candidates", "must be at least 1")
        require(0 <= self.seed < SEED_LIMIT, f"{where}.seed", f"must be in [0, {SEED_LIMIT})")
        require(self.nproc == "auto" or self.nproc >= 1, f"{where}.nproc", "must be auto or at least 1")
        require(self.num_workers == "auto" or self.num_workers >= 0, f"{where}.num_workers", "must be auto or >= 0")
        require(self.grad_accumulation >= 1 and self.log_every >= 1, where,
                "grad_accumulation and log_every must be at least 1")
        require(self.steps_per_item == "auto" or self.steps_per_item >= 1, f"{where}.steps_per_item",
                "must be auto or at least 1")
        fixed = [n for n in (self.nproc, self.grad_accumulation) if n != "auto"]
        require(self.batch_size % _product(fixed) == 0, f"{where}.batch_size",
                f"{self.batch_size} must divide by nproc x grad_accumulation ({_product(fixed)})")

    def planned_steps(self, train_rows: int) -> int:
        """The run's optimizer steps on `train_rows` pretraining rows: `steps`, or with `epochs`
        the steps of that many passes over the rows, capped at `steps` (at least one)."""
        return self.steps if self.epochs is None else epoch_steps(self.epochs, train_rows, self.batch_size, self.steps)

    def for_corpus(self, train_rows: int) -> PretrainConfig:
        """These settings with `steps` the planned steps on `train_rows` rows: the one number the
        schedule, the checkpoints, resuming, the logs and the lineage use. A `warmup_steps` that
        no longer fits below them keeps its share of the cap (50 of 1000 steps: 5 of 100);
        a `checkpoint_every` beyond them leaves one checkpoint, at the end. The same for settings
        already sized: `for_corpus(n).for_corpus(n) == for_corpus(n)`."""
        steps = self.planned_steps(train_rows)
        if steps == self.steps:
            return self
        warmup_steps = self.warmup_steps if self.warmup_steps < steps else self.warmup_steps * steps // self.steps
        return dataclasses.replace(self, steps=steps, warmup_steps=warmup_steps)


def epoch_steps(epochs: float, rows: int, batch_size: int, cap: int) -> int:
    """Optimizer steps of `epochs` passes over `rows` in batches of `batch_size`, capped at `cap`
    (at least one): the length rule of pretraining (`PretrainConfig.epochs`) and fine-tuning."""
    return max(1, min(cap, math.ceil(epochs * rows / batch_size)))


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


INITS = ("ssl", "scratch", "generic", "baseline")


@dataclass
class FinetuneConfig:
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # fractions below `small_fraction` run with these seeds instead (their spread is the largest)
    small_fraction: float = 0.1
    small_fraction_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # ssl: domain-pretrained; scratch: same architecture, random; generic: `generic_checkpoint`
    # (or model.base_checkpoint); baseline: the domain's classical features + logistic regression
    inits: list[Literal["ssl", "scratch", "generic", "baseline"]] = field(
        default_factory=lambda: ["ssl", "scratch", "generic", "baseline"])
    protocols: list[Literal["linear", "knn", "finetune", "abmil"]] = field(
        default_factory=lambda: ["linear", "knn", "finetune"])
    generic_checkpoint: str | None = None  # the off-the-shelf encoder to compare with; null: model.base_checkpoint
    generic_protocols: list[Literal["linear", "knn", "finetune", "abmil"]] | None = None  # null: every protocol
    # abmil (labeled slides, bags of tiles): a gated-attention MIL head (Ilse et al., ICML 2018) on the
    # frozen tile embeddings, `abmil_hidden` wide, `abmil_epochs` passes over the subset (capped at max_steps)
    abmil_hidden: int = 128
    abmil_epochs: float = 50.0
    # where fine-tuning's linear head starts: probe (LP-FT: the fitted probe's head, Kumar et al. 2022)
    # or fresh (a random head, as transformers' AutoModelForSequenceClassification and timm's
    # create_model(num_classes=...) start); generic_head_init: the generic checkpoint's (null: head_init)
    head_init: Literal["probe", "fresh"] = "probe"
    generic_head_init: Literal["probe", "fresh"] | None = "fresh"
    # fine-tuning length: `epochs` over the labeled subset, capped at `max_steps` (at least 1 step)
    epochs: float = 5.0
    max_steps: int = 200
    batch_size: int = 16
    learning_rate: float = 3e-4
    head_learning_rate: float = 1e-2
    knn_neighbors: int = 5
    # the probe's inverse regularisation: `cv` picks from `linear_c_grid` by stratified
    # cross-validation inside the labeled subset (never the test set); a number fixes it
    linear_c: float | Literal["cv"] = "cv"
    linear_c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    # balanced: every class weighs as much in the probes' and fine-tuning's loss as the others
    # (scikit-learn's class_weight="balanced", n / (classes x count), from the labeled subset): the
    # metric is macro-averaged, and unweighted fits on imbalanced labels predict the majority class
    class_weight: Literal["balanced"] | None = "balanced"
    cv_folds: int = 5
    bootstrap_samples: int = 1000  # paired bootstrap over test samples and seeds, for the intervals
    confidence: float = 0.95
    save_models: bool = True
    nproc: int | Literal["auto"] = "auto"  # processes running (init, seed) jobs side by side; auto: one per GPU, 1 on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self, where: str) -> None:
        require(bool(self.label_fractions) and all(0 < f <= 1 for f in self.label_fractions), where,
                "label_fractions must list fractions in (0, 1]")
        require(len(self.seeds) > 0 and len(self.small_fraction_seeds) > 0, where,
                "seeds and small_fraction_seeds must list at least one seed")
        require(len(self.inits) > 0 and len(self.protocols) > 0, where, "inits and protocols must not be empty")
        require(self.epochs > 0 and self.max_steps > 0 and self.batch_size > 0, where,
                "epochs, max_steps and batch_size must be positive")
        require(self.knn_neighbors > 0, where, "knn_neighbors must be positive")
        require(self.abmil_hidden > 0 and self.abmil_epochs > 0, where, "abmil_hidden and abmil_epochs must be positive")
        require(self.linear_c == "cv" or self.linear_c > 0, f"{where}.linear_c", "must be cv or a positive number")
        require(bool(self.linear_c_grid) and all(c > 0 for c in self.linear_c_grid), f"{where}.linear_c_grid",
                "must list positive numbers")
        require(self.cv_folds >= 2, f"{where}.cv_folds", "must be at least 2")
        require(self.bootstrap_samples >= 100 and 0 < self.confidence < 1, where,
                "bootstrap_samples must be at least 100 and confidence in (0, 1)")
        require(self.nproc == "auto" or self.nproc >= 1, f"{where}.nproc", "must be auto or at least 1")
        require(self.learning_rate >= 0 and self.head_learning_rate >= 0, where,
                "learning_rate and head_learning_rate must be >= 0 (0: that part stays as it starts)")
        require(0 <= self.small_fraction <= 1, f"{where}.small_fraction", "must be a fraction in [0, 1]")
        require(all(0 <= seed < SEED_LIMIT for seed in [*self.seeds, *self.small_fraction_seeds]), where,
                f"seeds and small_fraction_seeds must be in [0, {SEED_LIMIT})")

    def seeds_for(self, fraction: float) -> list[int]:
        """The seeds a label fraction runs with."""
        return self.small_fraction_seeds if fraction < self.small_fraction else self.seeds


@dataclass
class DomainConfig:
    """One domain block of params.yaml, every section a typed object.

    `ingest`, `preprocess`, `model` and `default_data` are the dataclasses the domain declares;
    `pretrain.options` is the chosen method's options dataclass. Paths are as written in
    params.yaml (relative to the project root unless absolute)."""

    name: str
    module: str
    corpus: Path
    labels: Path | None
    split: SplitConfig
    ingest: Any
    preprocess: Any
    model: Any
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    default_data: Any
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    cpu_threads: int | None = None  # torch threads in training and embedding; null: torch's default
    root: Path = Path(".")  # the project root (the folder of params.yaml): relative paths start here
    preset: str | None = None  # the chosen preset (laid over the sections above), null: none
    presets: tuple[str, ...] = ()  # the names of the presets the block offers

    def resolve(self, path: str | Path) -> Path:
        """A path setting of params.yaml (corpus, base_checkpoint...) as a path on disk."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path


DOMAIN_SECTIONS = ("ingest", "preprocess", "model", "default_data")  # typed by the domain module


@functools.cache
def _block_type(domain_type: type[Domain]) -> type:
    """A domain block of params.yaml as one dataclass: its own settings, the shared sections and the
    domain's sections, validated together."""
    sections = {"split": SplitConfig, **{name: domain_type.sections[name] for name in DOMAIN_SECTIONS},
                "pretrain": PretrainConfig, "finetune": FinetuneConfig, "privacy": PrivacyConfig}
    return dataclasses.make_dataclass(f"{domain_type.__name__}Block", [
        ("module", str), ("corpus", str), ("labels", str | None, None), ("cpu_threads", int | None, None),
        ("preset", str | None, None), ("presets", dict[str, dict[str, Any]], field(default_factory=dict)),
        *[(name, section, field(default_factory=section)) for name, section in sections.items()]])


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last one
    silently; DVC's ruamel.yaml refuses the file): a block pasted twice, or a file cut off and
    appended to, is not read one way here and another way by DVC."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def load_params(params_path: Path = Path("params.yaml")) -> dict[str, Any]:
    """params.yaml as a mapping; one line naming the file and what is wrong when it is missing,
    not UTF-8 text, not YAML, or not a mapping with a `domains:` mapping."""
    if not params_path.exists():
        raise PipelineError(f"{params_path} not found; run from the project root")
    try:
        text = params_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise PipelineError(f"{params_path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} on line {line}, "
                            f"offset {error.start}); it must be a YAML file in UTF-8") from None
    try:
        params = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise PipelineError(f"{params_path} is not valid YAML: {reason}") from None
    except RecursionError:
        raise PipelineError(f"{params_path} is not valid YAML: nested too deeply") from None
    if not isinstance(params, dict) or not isinstance(params.get("domains") or {}, dict):
        raise PipelineError(f"{params_path}: expected a mapping with a `domains:` block")
    return params


def declared_params(dvc_file: Path, domain: str) -> list[str]:
    """The params.yaml keys under `domains.<domain>` that `dvc_file`'s stages declare (`params:`
    lists, `${key}` taken as the block name for stages with `foreach: ${domains}`), as dotted paths
    below the block (`finetune`, `model.backbone`); none when there is no such file."""
    if not dvc_file.exists():
        return []
    try:
        stages = (yaml.safe_load(dvc_file.read_bytes().decode("utf-8")) or {}).get("stages") or {}
    except (UnicodeDecodeError, yaml.YAMLError, AttributeError) as error:
        reason = " ".join(str(error).split())
        raise PipelineError(f"{dvc_file} is not a readable DVC pipeline file: {reason}") from None
    prefix, declared = f"domains.{domain}.", []
    for stage in stages.values() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        foreach = stage.get("foreach") == "${domains}"
        body = stage.get("do") if foreach else stage
        entries = body.get("params") if isinstance(body, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            # an entry is a key of params.yaml, or {file: [keys]} naming its file
            keys = [entry] if isinstance(entry, str) else entry.get("params.yaml") if isinstance(entry, dict) else None
            for key in keys if isinstance(keys, list) else ():
                key = key.replace("${key}", domain) if foreach and isinstance(key, str) else key
                if isinstance(key, str) and key.startswith(prefix) and key not in declared:
                    declared.append(key)
    return [key.removeprefix(prefix) for key in declared]


def check_declared_params(block: dict[str, Any], declared: list[str], where: str, dvc_file: Path) -> None:
    """Refuse a block lacking a key that dvc.yaml declares for its stages (a cut-off params.yaml):
    the stage would run on built-in defaults while DVC counts the key as deleted and `dvc repro`
    fails after the run (MissingParamsError)."""
    missing = []
    for key in declared:
        value: Any = block
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                missing.append(key)
                break
            value = value[part]
    if missing:
        raise PipelineError(f"params.yaml {where} lacks {', '.join(missing)}, which {dvc_file.name} declares as "
                            "parameters of its stages (a cut-off file?); add them back (null or {} "
                            "takes the defaults)")


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` laid over it, mapping by mapping (a preset changes only what it
    names), except a method's `options`, which a preset replaces whole (they belong to its method)."""
    result = dict(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(result.get(key), dict) and key != "options"
        result[key] = merged(result[key], value) if nested else value
    return result


def apply_preset(block: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
    """The block with its chosen `preset` (one of its `presets`, e.g. a GPU-sized model) laid over
    it, and the block's place for messages. Presets not chosen are not read."""
    choice, presets = block.get("preset"), block.get("presets") or {}
    if choice is None:
        return block, where
    if not isinstance(presets, dict) or not isinstance(choice, str) or choice not in presets:
        names = sorted(map(str, presets)) if isinstance(presets, dict) else []
        raise PipelineError(f"params.yaml {where}.preset: {choice!r} is not one of the block's presets {names} "
                            "(or null)")
    if not isinstance(presets[choice], dict):
        raise PipelineError(f"params.yaml {where}.presets.{choice}: {presets[choice]!r} should be a mapping of "
                            "settings")
    return merged(block, presets[choice]), f"{where} (preset {choice})"


def load_config(domain: str, params_path: Path = Path("params.yaml")) -> tuple[DomainConfig, Domain]:
    """Parse and validate the `domains.<domain>` block with its chosen preset, method options
    included, in one pass; return it with the domain module that reads it. Imports no torch:
    fails in well under a second."""
    domains = load_params(params_path).get("domains") or {}
    if domain not in domains:
        raise PipelineError(f"params.yaml has no block domains.{domain}; blocks: {sorted(map(str, domains))}")
    dvc_file = params_path.parent / "dvc.yaml"
    if isinstance(domains[domain], dict):
        check_declared_params(domains[domain], declared_params(dvc_file, domain), f"domains.{domain}", dvc_file)
    return parse_block(domain, domains[domain], params_path.parent)


def parse_block(domain: str, block: Any, root: Path, source: str = "params.yaml") -> tuple[DomainConfig, Domain]:
    """`load_config` of a block already read (`source` names where from, in the errors); relative
    paths in it start at `root`."""
    from ssl_models.core.domain import get_domain

    where, block = f"domains.{domain}", block or {}
    if not isinstance(block, dict):
        raise PipelineError(f"{source} {where}: expected a mapping of settings")
    refuse_non_finite(block, where)  # here, before the preset: named where it is written
    block, where = apply_preset(block, where)
    for key in ("module", "corpus"):
        if not block.get(key):
            raise PipelineError(f"{source} {where}.{key} is required")
    owner = get_domain(validated(str, block["module"], f"{where}.module"))
    block_type = _block_type(type(owner))
    sections = {f.name for f in dataclasses.fields(block_type) if dataclasses.is_dataclass(f.type)}
    # a section with nothing under it (`ingest:`) takes its defaults
    parsed = validated(block_type, {key: {} if value is None and key in sections else value
                                    for key, value in block.items()}, where)
    require(parsed.cpu_threads is None or parsed.cpu_threads > 0, f"{where}.cpu_threads",
            "must be a positive number of threads or null")
    pretrain = parsed.pretrain
    pretrain.method = pretrain.method or owner.default_method
    owner.methods.check(pretrain.method, f"{where}.pretrain.method")
    pretrain.options = parse_section(owner.methods.options(pretrain.method), pretrain.options or None,
                                     f"{where}.pretrain.options")
    cfg = DomainConfig(
        name=domain, module=parsed.module, corpus=Path(parsed.corpus),
        labels=Path(parsed.labels) if parsed.labels else None, split=parsed.split, pretrain=pretrain,
        finetune=parsed.finetune, privacy=parsed.privacy, cpu_threads=parsed.cpu_threads, root=root,
        preset=parsed.preset, presets=tuple(parsed.presets),
        **{name: getattr(parsed, name) for name in DOMAIN_SECTIONS})
    asked = [*cfg.finetune.protocols, *(cfg.finetune.generic_protocols or [])]
    require("abmil" not in asked or owner.gives_bags(cfg), f"{where}.finetune.protocols",
            "abmil pools the instances of a bag: it needs labeled rows that are bags (histopathology with "
            "preprocess.labeled_unit: slide); with one embedding per labeled row, use linear, knn or finetune")
    owner.validate(cfg)
    return cfg, owner


def section_params(section: Any) -> Any:
    """A typed section back as plain values, for lineage records."""
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def made_by(section: Any) -> Any:
    """`section_params` without the settings that say how the work runs (`ParallelWork`'s), not
    what it makes: the lineage record, and so the artifact, is the same for any of them."""
    values = section_params(section)
    if isinstance(section, ParallelWork):
        values = {key: value for key, value in values.items() if key not in _EXECUTION_FIELDS}
    return values


_EXECUTION_FIELDS = frozenset(field.name for field in dataclasses.fields(ParallelWork))
