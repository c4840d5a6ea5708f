"""Wall time of each stage of one domain's default pipeline from a clean copy, then of a
no-op `dvc repro`, on this machine. Prints a table; figures go into BENCHMARKS.md.

    .venv/bin/python benchmarks/pipeline_timing.py [--domain legal]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import STAGES, copy_project_code, dvc, reproduce_stages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domain", default="legal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "params.yaml", folder / "params.yaml")
        copy_project_code(folder)
        rows = reproduce_stages(folder, args.domain, STAGES)
        started = time.perf_counter()
        output = dvc(folder, "repro", f"report@{args.domain}").stdout  # checks every upstream stage
        noop = time.perf_counter() - started
        assert "Running stage" not in output
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
        print(f"{'stage':<14}{'seconds':>9}")
        for stage, seconds in rows:
            print(f"{stage:<14}{seconds:>9.1f}")
        print(f"{'total':<14}{sum(s for _, s in rows):>9.1f}")
        print(f"{'no-op repro':<14}{noop:>9.1f}")
        report = folder / "reports" / args.domain / "report" / "report.md"
        text = report.read_text()
        print(text[text.index("## Verdict"): text.index("## Pretraining")])


if __name__ == "__main__":
    main()
