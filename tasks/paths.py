"""Where each stage writes, per domain: the contract dvc.yaml declares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DomainPaths:
    domain: str
    root: Path = Path(".")

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
