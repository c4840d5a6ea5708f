"""The one entry to every stage: `ssl-pipeline <stage> <domain>` (dvc.yaml and the flow call it).

Also `ssl-pipeline lineage show|verify <artifact folder>`. Bad input or configuration prints one
line naming the file or setting, and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def stage_functions() -> dict[str, Callable[[str], object]]:
    from tasks.default_data import default_data
    from tasks.evaluate import evaluate
    from tasks.finetune import finetune
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.pretrain import pretrain
    from tasks.report import report

    return {"default_data": default_data, "ingest": ingest, "preprocess": preprocess, "pretrain": pretrain,
            "finetune": finetune, "evaluate": evaluate, "report": report}


STAGES = ("default_data", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"run the {stage} stage for one domain")
        sub.add_argument("domain", help="a block name under `domains:` in params.yaml")
    lineage = commands.add_parser("lineage", help="show or verify an artifact's lineage")
    lineage.add_argument("action", choices=("show", "verify"))
    lineage.add_argument("artifact", type=Path, help="an artifact folder, e.g. models/legal/finetune")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from ssl_models.core.errors import PipelineError

    try:
        if args.command == "lineage":
            return run_lineage(args.action, args.artifact)
        stage_functions()[args.command](args.domain)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run_lineage(action: str, artifact: Path) -> int:
    from tasks import lineage

    if action == "show":
        print(lineage.show(artifact))
        return 0
    problems = lineage.verify(artifact)
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"{len(problems)} mismatch(es) in the lineage of {artifact}" if problems
          else f"lineage of {artifact} verified: every file re-hashed and matched")
    return 1 if problems else 0
