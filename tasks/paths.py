"""Where each stage writes, per domain: the contract dvc.yaml declares (a test holds the two equal)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DomainPaths:
    """Every artifact path of one domain under the project `root`."""

    domain: str
    root: Path = Path(".")

    def resolve(self, path: Path | str) -> Path:
        """A path from params.yaml (relative to the project root unless absolute)."""
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def relative(self, path: Path) -> str:
        """How lineage records name an artifact: relative to the project root."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    @property
    def default_data(self) -> Path:
        return self.root / "data" / self.domain / "default"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / self.domain / "manifest"

    @property
    def shards(self) -> Path:
        return self.root / "data" / self.domain / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / self.domain / "checkpoints"

    @property
    def pretrain(self) -> Path:
        return self.root / "models" / self.domain / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "models" / self.domain / "finetune"

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / self.domain / "metrics.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "reports" / self.domain / "evaluation"

    @property
    def plots(self) -> Path:
        return self.root / "reports" / self.domain / "plots"

    @property
    def report(self) -> Path:
        return self.root / "reports" / self.domain / "report"

    def outputs(self, stage: str) -> list[Path]:
        """What `stage` writes: exactly the `outs`, `metrics` and `plots` of its dvc.yaml entry."""
        return {"default_data": [self.default_data], "ingest": [self.manifest], "preprocess": [self.shards],
                "pretrain": [self.pretrain, self.checkpoints], "finetune": [self.finetune],
                "evaluate": [self.evaluation, self.metrics, self.plots / "label_efficiency.csv",
                             self.plots / "pretrain_curve.csv"],
                "report": [self.report]}[stage]
