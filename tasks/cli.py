"""The one entry to every stage: `ssl-pipeline <stage> <domain>` (dvc.yaml and the flow call it).

Also `ssl-pipeline lineage show|verify <artifact folder>`. The whole domain block of params.yaml
is parsed and checked before any stage works; bad input or configuration prints one line
naming the file or setting, and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

# The stages in data-flow order: dvc.yaml declares one entry each (a test holds them equal),
# and the Prefect flow runs them in this order. Stage `s` is the function `tasks.<s>.<s>`,
# called as `s(cfg, domain, paths)`.
STAGES = ("default_data", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="project root holding params.yaml (default: the working directory)")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"run the {stage} stage for one domain")
        sub.add_argument("domain", help="a block name under `domains:` in params.yaml")
    lineage = commands.add_parser("lineage", help="show or verify an artifact's lineage")
    lineage.add_argument("action", choices=("show", "verify"))
    lineage.add_argument("artifact", type=Path, help="an artifact folder, e.g. models/legal/finetune")
    return parser.parse_args(argv)


def run_stage(stage: str, domain_name: str, root: Path = Path(".")) -> object:
    """Parse and check the domain's block, then run `stage` on it (what the CLI does)."""
    from ssl_models.core.config import load_config
    from tasks.paths import DomainPaths

    cfg, domain = load_config(domain_name, root / "params.yaml")
    function = getattr(importlib.import_module(f"tasks.{stage}"), stage)
    return function(cfg, domain, DomainPaths(domain_name, root))


def main(argv: list[str] | None = None) -> int:
    from ssl_models.core.offline import apply_offline_env

    apply_offline_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ssl_models.core.errors import PipelineError

    try:
        if args.command == "lineage":
            return run_lineage(args.action, args.artifact, args.root)
        run_stage(args.command, args.domain, args.root)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_lineage(action: str, artifact: Path, root: Path) -> int:
    from tasks import lineage

    if action == "show":
        print(lineage.show(artifact, root))
        return 0
    problems = lineage.verify(artifact, root)
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"{len(problems)} mismatch(es) in the lineage of {artifact}" if problems
          else f"lineage of {artifact} verified: every file re-hashed and matched")
    return 1 if problems else 0
