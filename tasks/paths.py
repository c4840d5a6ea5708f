"""Where each stage writes, per domain: the contract dvc.yaml declares (a test holds the two equal)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def relative_to(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies below it, else as given (POSIX separators)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class _Artifact:
    """A path under the project root, `{domain}` filled in: `paths.manifest` -> root/data/legal/manifest."""

    def __init__(self, template: str) -> None:
        self.template = template

    def __get__(self, paths: DomainPaths, owner: type) -> Path:
        return paths.root / self.template.format(domain=paths.domain)


@dataclass(frozen=True)
class DomainPaths:
    """Every artifact path of one domain under the project `root`."""

    domain: str
    root: Path = Path(".")

    default_data = _Artifact("data/{domain}/default")
    manifest = _Artifact("data/{domain}/manifest")
    shards = _Artifact("data/{domain}/shards")
    checkpoints = _Artifact("models/{domain}/checkpoints")
    pretrain = _Artifact("models/{domain}/pretrain")
    finetune = _Artifact("models/{domain}/finetune")
    evaluation = _Artifact("reports/{domain}/evaluation")
    metrics = _Artifact("reports/{domain}/metrics.json")
    plots = _Artifact("reports/{domain}/plots")
    report = _Artifact("reports/{domain}/report")
    export = _Artifact("models/{domain}/export")

    def relative(self, path: Path) -> str:
        """How lineage records name an artifact: relative to the project root."""
        return relative_to(path, self.root)

    def outputs(self, stage: str) -> list[Path]:
        """What `stage` writes: exactly the `outs`, `metrics` and `plots` of its dvc.yaml entry."""
        return {"default_data": [self.default_data], "ingest": [self.manifest], "preprocess": [self.shards],
                "pretrain": [self.pretrain], "finetune": [self.finetune],
                "evaluate": [self.evaluation, self.metrics, self.plots / "label_efficiency.csv",
                             self.plots / "pretrain_curve.csv"],
                "report": [self.report], "export": [self.export]}[stage]

    def working_state(self, stage: str) -> list[Path]:
        """What `stage` keeps between its runs on this machine and DVC does not version: pretrain's
        resumable checkpoints, a data stage's finished chunks (a remote carries none, so a clone that
        pulled has nothing to re-run)."""
        return [self.checkpoints] if stage == "pretrain" else [self.work(stage)]

    def work(self, stage: str) -> Path:
        """Where a data stage keeps its finished chunks until its output is in place (tasks/workers.py):
        `.ssl-pipeline/work/<domain>/<stage>`, this machine's run-time state."""
        return self.workspace / "work" / self.domain / stage

    def inputs(self, stage: str) -> dict[Path, str]:
        """The artifacts `stage` reads (its dvc.yaml deps made by other stages) -> the stage making each."""
        made_by = {self.manifest: "ingest", self.shards: "preprocess", self.pretrain: "pretrain",
                   self.finetune: "finetune", self.evaluation: "evaluate"}
        needs = {"default_data": [], "ingest": [], "preprocess": [self.manifest], "pretrain": [self.shards],
                 "finetune": [self.shards, self.pretrain], "evaluate": [self.finetune, self.pretrain, self.shards],
                 "report": [self.evaluation, self.pretrain, self.manifest, self.shards],
                 "export": [self.pretrain, self.evaluation, self.manifest, self.shards]}[stage]
        return {path: made_by[path] for path in needs}

    @property
    def workspace(self) -> Path:
        """Run-time state of this checkout that no stage declares: locks, error logs (`.ssl-pipeline/`)."""
        return self.root / ".ssl-pipeline"

    @property
    def lock(self) -> Path:
        """The lock one run of a stage of this domain holds: `.ssl-pipeline/locks/<domain>.lock`."""
        return self.workspace / "locks" / f"{self.domain}.lock"
