"""The contract every domain module fulfils, and the registry that finds it by name.

Stages in `tasks/` talk to a domain only through `Domain`; adding a domain is one package in
`ssl_models/` that registers a `Domain` subclass, plus one block in params.yaml. A domain
declares its sections (dataclasses), its SSL methods and its backbones (registries); the config
loader parses and checks everything before any stage works. A domain package imports torch,
transformers and its other model libraries inside the methods that need them, so that loading
and checking the config, default_data and ingest start in a second.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ssl_models.core.errors import PipelineError
from ssl_models.core.registry import Registry
from ssl_models.core.shards import PRETRAIN_PARTS

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch is imported by the stages that train, not by ingest
    from ssl_models.core.config import DomainConfig
    from ssl_models.core.modules import Encoder, PretrainMethod


def relative_key(path: Path, corpus: Path) -> str:
    """`path` relative to `corpus`, POSIX separators (the walk's paths start with the corpus' own
    text, so this is a string slice: a million `Path.relative_to` calls cost seconds)."""
    text, base = os.fspath(path), os.fspath(corpus)
    if os.sep == "/" and text.startswith(base + "/"):
        return text[len(base) + 1:]
    return path.relative_to(corpus).as_posix()


@dataclass
class Source:
    """What one `read` call reads: usually one file; a DICOM series is a folder of slices.

    `key` is how the labels CSV names it: the path relative to the corpus (of the file, or
    of the folder for a series).
    """

    key: str
    paths: list[Path]


@dataclass
class Record:
    """One sample found by a reader: a document, a volume, a clip or a slide.

    `key` is how the labels CSV names it (the source's key, or `path#L<n>` for a record
    inside a file); `sha256` hashes its content. `group` (a patient) keeps related records in
    one split when the labels CSV gives no group.
    """

    key: str
    sha256: str
    n_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    content: Any = None  # the decoded sample for preprocess; never written to the manifest
    group: str | None = None  # e.g. the header's patient id: written only as a pseudonym when private


@dataclass
class Rejected:
    """A record inside a readable file that cannot be used (a bad line in a JSONL file)."""

    key: str
    reason: str


Locate = Callable[[dict[str, Any]], Source]


def rows_by_source(manifest: Iterable[dict[str, Any]], locate: Locate) -> Iterator[tuple[Source, list[dict[str, Any]]]]:
    """(source, its rows) in the manifest's order: ingest writes a source's rows one after another,
    so one source's rows are held at a time, and `locate` is asked in the manifest's order."""
    for _, group in itertools.groupby(manifest, key=lambda row: row["source"]):
        rows = list(group)
        yield locate(rows[0]), rows


class Domain(ABC):
    """Readers, default data, preprocessing, SSL methods and encoders for one kind of data.

    A domain registers itself by subclassing with its package name, `class Audio(Domain,
    module="audio")`, and sets `name`, `suffixes`, `sections` (the dataclass of each of its
    params.yaml sections: ingest, preprocess, model, default_data), `methods` (its SSL methods,
    each with its options dataclass), `backbones` (callables `(cfg, shards_dir) -> Encoder`,
    chosen by `model.backbone`) and `baseline` (its classical features, or None). Fine-tuning's
    encoders come through `load_encoder`, which dispatches on the init: a domain declares
    `load_pretrained`, and `build_scratch` / `build_generic` where the defaults do not fit."""

    def __init_subclass__(cls, module: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if module is not None:
            DOMAINS.register(module)(cls)

    name: str = ""
    suffixes: tuple[str, ...] = ()
    default_task = ""  # the report's sentence on the default data's labeled task (with its attribution)
    task_kind = "classification"  # what a user's labels CSV asks for, e.g. "document classification"
    pseudonymise_by_default = False  # keys, groups and file names become salted hashes
    # `sources` takes the corpus' files as a stream, one source at a time (ingest then holds no
    # list of the corpus); False where grouping needs every file first (DICOM series)
    streams_sources = True
    # a file of a source of at most this many bytes is read whole by ingest for its digest and its
    # reader takes those bytes (`hashing.file_contents`) instead of opening it again; 0: the reader
    # opens its files itself (a slide or a volume, decoded from the file by its library)
    reads_taken_bytes = 0
    # at most this many sources to a chunk of ingest's work when `ingest.chunk_size` is auto: enough
    # that a chunk's own cost (a round trip to a worker, its result file, one duplicate-index query)
    # is small beside its files' work, few enough that a kill loses little
    ingest_chunk_items = 64
    # the same for preprocess: a chunk's results (its tiles, cubes) are held while they are written,
    # two chunks a worker in flight, so a domain whose sources make large outputs keeps this small
    preprocess_chunk_items = 64
    default_method: ClassVar[str] = ""  # the `methods` entry pretrain.method names when params.yaml names none
    sections: ClassVar[dict[str, type]] = {}
    methods: ClassVar[Registry]
    backbones: ClassVar[Registry]
    # The module of the classical baseline ("package.module"): its `features(cfg, pool, test)` are
    # init `baseline`, the first sentence of its docstring says in the report what they are.
    # None: the domain offers no `baseline` init.
    baseline: ClassVar[str | None] = None

    def accepts(self, path: Path) -> bool:
        """Whether `path` is a file this domain reads (others are quarantined as unsupported)."""
        return path.name.lower().endswith(self.suffixes)

    def sources(self, files: Iterable[Path], corpus: Path, cfg: DomainConfig) -> Iterator[Source | Rejected]:
        """Group the accepted files of the corpus into sources, one `read` each; by default one
        file is one source. A domain whose samples span files (DICOM series) overrides this."""
        for path in files:
            yield Source(relative_key(path, corpus), [path])

    def pseudonymises(self, cfg: DomainConfig) -> bool:
        """Whether keys, file names and groups leave ingest only as salted hashes."""
        setting = cfg.privacy.pseudonymise
        return self.pseudonymise_by_default if setting is None else setting

    def splits_labeled_rows_at_preprocess(self, cfg: DomainConfig) -> bool:
        """Whether preprocess, not ingest, gives the labeled rows their split (then ingest cannot
        check that every class reaches the train split; preprocess does)."""
        return False

    def gives_bags(self, cfg: DomainConfig) -> bool:
        """Whether each labeled row is a bag of instances whose encoder gives their own features
        (`instance_features`, `pool_instances`): what the `abmil` protocol needs."""
        return False

    def validate(self, cfg: DomainConfig) -> None:
        """Checks across sections (each section checked itself when parsed): fail with
        `PipelineError` naming the settings that do not fit together."""

    @abstractmethod
    def read(self, source: Source, cfg: DomainConfig) -> Iterator[Record | Rejected]:
        """Yield the records of one source; raise `UnreadableFileError` with a reason when
        the whole source is unusable. A reason never quotes a file name or a header value."""

    @abstractmethod
    def write_default_data(self, out_dir: Path, cfg: DomainConfig) -> dict[str, Any]:
        """Lay out the embedded default corpus (`out_dir/corpus/`) and `out_dir/labels.csv`;
        return what was written (counts), for the stage's log."""

    @abstractmethod
    def preprocess(self, cfg: DomainConfig, manifest: Sequence[dict[str, Any]], out_dir: Path,
                   locate: Locate) -> dict[str, Any]:
        """Write `pretrain_train`, `pretrain_val` and `labeled` Arrow datasets under `out_dir`
        (`ssl_models.core.shards.write_shards`); return a summary (counts, what the shards hold;
        `labeled_test` when the labeled rows are not the manifest's, e.g. tiles). `locate(row)`
        gives the source a manifest row was read from (no file names in a pseudonymised manifest).
        The stage passes the manifest as `tasks.io.JsonlRows`: iterate it (each pass reads the file
        again) rather than keep its rows, and call `locate` in the manifest's order (the stage then
        holds one source at a time; out of order it keeps them all)."""

    def pretrain_dataset(self, shards_dir: Path, split: str) -> Sequence[dict[str, Any]]:
        """The `train` or `val` pretraining rows, indexable (a `datasets.Dataset`; [] when empty)."""
        from datasets import load_from_disk

        folder = shards_dir / PRETRAIN_PARTS[split]
        if not any(folder.glob("*.arrow")):  # datasets writes no table file for zero rows
            return []
        return load_from_disk(str(folder))

    def build_encoder(self, cfg: DomainConfig, shards_dir: Path) -> Encoder:
        """A new encoder to pretrain: `model.backbone` from the backbone registry (starting
        from `model.base_checkpoint` when the backbone supports one)."""
        return self.backbones.get(cfg.model.backbone)(cfg, shards_dir)

    def build_pretrain_method(self, cfg: DomainConfig, shards_dir: Path) -> PretrainMethod:
        """The method named by `pretrain.method` around a new encoder, with its parsed options; options
        with a `for_steps(steps)` (a schedule over the whole run: DINO's teacher momentum) get the
        run's steps (`pretrain.steps`, the planned number once the pretrain stage sized it)."""
        options = cfg.pretrain.options
        if hasattr(options, "for_steps"):
            options = options.for_steps(cfg.pretrain.steps)
        return self.methods.get(cfg.pretrain.method)(self.build_encoder(cfg, shards_dir), options)

    def load_encoder(self, init: str, cfg: DomainConfig, shards_dir: Path,
                     pretrained_dir: Path, seed: int) -> Encoder:
        """`ssl`: the encoder the pretrain stage saved in `pretrained_dir` (`load_pretrained`);
        `scratch`: the same architecture, randomly initialised from `seed` (`build_scratch`);
        `generic`: the generic checkpoint (`build_generic`, given `generic_config(cfg)`)."""
        import torch

        if init not in ENCODER_INITS:
            raise PipelineError(f"unknown init {init!r}")
        if init == "generic":
            cfg = self.generic_config(cfg)
        # torch and transformers initialise from the global generator: the scratch weights, and any
        # part a checkpoint lacks (BERT's pooler after MLM pretraining), come from `seed` alone, not
        # from whatever ran before in this process; the caller's generator is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init == "ssl":
                return self.load_pretrained(cfg, shards_dir, pretrained_dir)
            if init == "scratch":
                return self.build_scratch(cfg, shards_dir, pretrained_dir)
            return self.build_generic(cfg, shards_dir)

    def export(self, cfg: DomainConfig, encoder: Encoder, out_dir: Path) -> dict[str, Any]:
        """Write `encoder` (loaded by `load_encoder`, in eval mode) into the empty folder `out_dir` in
        the format its field loads without this project: the bare encoder's weights in safetensors,
        no head and no key prefix, and the input settings beside them. Returns what the model card
        says of it: `library` (what loads it), `format` (a phrase), `snippet` (Python that loads the
        folder named by `FOLDER` with that library alone and defines `embed(inputs)` giving the
        pipeline's embeddings) and `inputs` (what `embed` takes)."""
        raise PipelineError(f"export is not available for domain {self.name!r} yet")

    def load_export(self, cfg: DomainConfig, folder: Path) -> Encoder:
        """The inverse of `export`: the encoder the pipeline uses (its `collate` and `forward`), read
        from the files `export` wrote in `folder` alone, strictly (every weight there, none left over:
        `load_exported_weights`). `cfg` is the block the export carries (its ssl_pipeline.json), with
        `model.base_checkpoint`, where the exporting block had one, naming `folder`."""
        raise PipelineError(f"embedding with an export folder is not available for domain {self.name!r} yet; "
                            "embed with the project that exported it (`ssl-pipeline embed <block> ...`)")

    def load_pretrained(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """Init `ssl`: the encoder `Encoder.save` wrote in `pretrained_dir`, its architecture and weights.
        Every domain declares it (not abstract while tests' stand-in domains override `load_encoder`)."""
        raise NotImplementedError(f"domain {self.name!r} declares no load_pretrained")

    def build_scratch(self, cfg: DomainConfig, shards_dir: Path, pretrained_dir: Path) -> Encoder:
        """Init `scratch`, random draws seeded by `load_encoder`: by default `model.backbone` as
        built for pretraining, without its base checkpoint. A domain whose saved encoder records its
        own architecture builds that instead."""
        if getattr(cfg.model, "base_checkpoint", None) is not None:
            from dataclasses import replace

            cfg = replace(cfg, model=replace(cfg.model, base_checkpoint=None))
        return self.build_encoder(cfg, shards_dir)

    def build_generic(self, cfg: DomainConfig, shards_dir: Path) -> Encoder:
        """Init `generic`, `cfg` from `generic_config` (`model.base_checkpoint` is the generic
        checkpoint): by default `model.backbone` built from its base checkpoint."""
        return self.build_encoder(cfg, shards_dir)

    @property
    def package(self) -> str:
        """The domain's Python package (`ssl_models.audio`), where its optional modules live."""
        return type(self).__module__.rsplit(".", 1)[0] if type(self).__module__.count(".") > 1 else type(self).__module__

    def generic_checkpoint(self, cfg: DomainConfig) -> str | None:
        """The off-the-shelf checkpoint init `generic` loads: `finetune.generic_checkpoint`, else
        the base checkpoint domain pretraining continues from (null: no `generic` init)."""
        return cfg.finetune.generic_checkpoint or getattr(cfg.model, "base_checkpoint", None)

    def generic_config(self, cfg: DomainConfig) -> DomainConfig:
        """`cfg` with `model.base_checkpoint` set to the generic checkpoint, as `build_generic`
        reads it; one clear line when there is none."""
        from dataclasses import replace

        checkpoint = self.generic_checkpoint(cfg)
        if not checkpoint:
            raise PipelineError(f"init `generic` needs domains.{cfg.name}.finetune.generic_checkpoint (or "
                                "model.base_checkpoint) in params.yaml")
        return replace(cfg, model=replace(cfg.model, base_checkpoint=checkpoint))

    def has_baseline(self) -> bool:
        """Whether the domain declares classical baseline features (`baseline`)."""
        return self.baseline is not None

    def baseline_features(self, cfg: DomainConfig, pool: list[dict[str, Any]],
                          test: list[dict[str, Any]]) -> tuple[Any, Any]:
        """Classical features of the labeled pool and test rows (numpy arrays or scipy sparse
        matrices) for init `baseline`: `<baseline>.features(cfg, pool, test)`. Whatever the
        features learn without labels (a TF-IDF vocabulary, say) is fitted on the pool only."""
        return importlib.import_module(self.baseline).features(cfg, pool, test)

    def baseline_description(self) -> str | None:
        """The report's words for the baseline: the first sentence of its module docstring,
        parentheses dropped, lower-cased first letter (None without a baseline)."""
        if self.baseline is None:
            return None
        doc = importlib.import_module(self.baseline).__doc__ or ""
        first = re.sub(r"\s*\([^)]*\)", "", " ".join(doc.split()).split(". ")[0]).strip().rstrip(".")
        return first[:1].lower() + first[1:] if first else None

    def available_inits(self, cfg: DomainConfig) -> list[str]:
        """Initialisations this configuration can offer: no `generic` without a generic
        checkpoint, no `baseline` where the domain ships no baseline features."""
        inits = ["ssl", "scratch"]
        if self.generic_checkpoint(cfg):
            inits.append("generic")
        if self.has_baseline():
            inits.append("baseline")
        return inits

    def task_description(self, cfg: DomainConfig, uses_default_data: bool) -> str:
        """One sentence for the report: what the labeled task is."""
        if uses_default_data and self.default_task:
            return self.default_task
        return f"{self.task_kind} by the `label` column of {cfg.labels}"


def require_exact_load(folder: Path, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """One line when loading an export's weights left part of the model unset (random) or found
    tensors it has no place for, as a library's loader reports them before carrying on."""
    if missing or unexpected:
        raise PipelineError(f"the export {folder} does not load exactly: {len(missing)} weight(s) missing (e.g. "
                            f"{list(missing)[:2]}), {len(unexpected)} not used (e.g. {list(unexpected)[:2]}); its "
                            "settings and weights do not belong together: export the encoder again")


def load_exported_weights(module: Any, state: dict[str, Any], folder: Path) -> None:
    """`state` (an export's tensors) into the torch `module` strictly, or one line saying how they differ."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        reason = " ".join(str(error).split())[:300]
        raise PipelineError(f"the export {folder} does not fit the model its settings describe ({reason}); "
                            "export the encoder again") from None
    require_exact_load(folder, result.missing_keys, result.unexpected_keys)


# Continued pretraining (`model.base_checkpoint`) loads strictly: a checkpoint whose names or shapes
# differ from the configured backbone is one line naming the first few of each, never a backbone
# left partly random in silence (nor torch's multi-line "Error(s) in loading state_dict").
def require_checkpoint_fits(source: object, target: str, missing: Sequence[str], unexpected: Sequence[str],
                            mismatched: Sequence[tuple[str, Sequence[int], Sequence[int]]], hint: str) -> None:
    """One line when `missing` / `unexpected` names or `mismatched` (name, checkpoint shape, model
    shape) say the checkpoint at `source` does not load strictly into `target`."""
    if not (missing or unexpected or mismatched):
        return

    def first(items: Sequence[str]) -> str:
        return ", ".join(list(items)[:3]) + (", ..." if len(items) > 3 else "")

    shapes = [f"{name}: checkpoint {list(theirs)}, model {list(ours)}" for name, theirs, ours in sorted(mismatched)]
    parts = [f"{len(found)} {kind} ({first(sorted(found))})"
             for kind, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
             if found]
    raise PipelineError(f"checkpoint {source} does not load strictly into {target}: "
                        f"{'; '.join(parts)}; {hint}")


def load_checkpoint_strictly(module: Any, state: dict[str, Any], source: object, target: str, hint: str) -> None:
    """`state` into the torch `module`: every tensor of the module from `state` with its shape and
    nothing of `state` left over, or one line (`require_checkpoint_fits`)."""
    own = module.state_dict()
    mismatched = [(name, tuple(state[name].shape), tuple(tensor.shape)) for name, tensor in own.items()
                  if name in state and tuple(state[name].shape) != tuple(tensor.shape)]
    require_checkpoint_fits(source, target, [name for name in own if name not in state],
                            [name for name in state if name not in own], mismatched, hint)
    module.load_state_dict(state, strict=True)
    log.info("model.base_checkpoint: all %d tensors of %s loaded from %s", len(own), target, source)


def check_pretrained_loading(model: Any, loading: dict[str, Any], source: object, target: str,
                             hint: str) -> list[str]:
    """Strict loading of a transformers model read with `from_pretrained(..., output_loading_info=True,
    ignore_mismatched_sizes=True)`: its base model (the encoder) wholly from the checkpoint with
    every shape; each head beside it (an MLM head, wav2vec2's quantiser) wholly from the checkpoint
    or wholly new (a bare encoder's checkpoint has none: returned, by name), never partly; tensors of
    parts the model does not have (BERT's pooler, another task's head) left out, and logged."""
    prefix = model.base_model_prefix
    encoder_parts = {name for name, _ in model.base_model.named_children()}
    own = set(model.state_dict())
    heads: dict[str, set[str]] = {}
    for name in own:
        if not name.startswith(f"{prefix}."):
            heads.setdefault(name.split(".", 1)[0], set()).add(name)
    missing = set(loading["missing_keys"])
    new_heads = sorted(head for head, names in heads.items() if names & missing and names - set(
        getattr(model, "_tied_weights_keys", None) or {}) <= missing)
    fresh = {name for head in new_heads for name in heads[head]}
    unexpected = set(loading["unexpected_keys"])
    # a checkpoint tensor named like a part of the encoder that the encoder has no place for: a near miss
    near_misses = {name for name in unexpected
                   if name.removeprefix(f"{prefix}.").split(".", 1)[0] in encoder_parts}
    require_checkpoint_fits(source, target, sorted(missing - fresh), sorted(near_misses),
                            [(name, tuple(theirs), tuple(ours)) for name, theirs, ours in loading["mismatched_keys"]],
                            hint)
    if new_heads:
        log.info("model.base_checkpoint %s holds no %s: %s start%s new", source, " or ".join(new_heads),
                  "they" if len(new_heads) > 1 else "it", "" if len(new_heads) > 1 else "s")
    if unexpected - near_misses:
        log.info("model.base_checkpoint %s: %d tensor(s) of parts %s has not (e.g. %s) left out", source,
                  len(unexpected - near_misses), target, sorted(unexpected - near_misses)[0])
    log.info("model.base_checkpoint: the encoder of %s loaded strictly from %s", target, source)
    return new_heads


DOMAINS: Registry[type[Domain]] = Registry("domain module")
ENCODER_INITS = ("ssl", "scratch", "generic")  # the inits `Domain.load_encoder` loads an encoder for


def get_domain(module: str) -> Domain:
    """Import `ssl_models.<module>` (which registers itself) and return its domain."""
    if module not in DOMAINS:
        try:
            importlib.import_module(f"ssl_models.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"ssl_models.{module}":
                raise
            raise PipelineError(
                f"no domain module ssl_models.{module}; set `module:` in params.yaml to one of the "
                f"packages under ssl_models/ that registers a domain") from None
    return DOMAINS.get(module)()
