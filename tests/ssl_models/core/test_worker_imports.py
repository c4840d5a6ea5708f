"""What a data worker loads before its first item: the functions the stage's engine runs in worker
processes (pickled by name, so each worker imports their module) live in modules that import neither
`datasets` nor `pyarrow` (about 1.2 s a process here; only the stage's own process writes shards) nor
MONAI or torch (imported with the first volume that needs them). Each worker pays its imports itself,
so an import at the top of one of these modules is paid once per worker, not once per stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

WORKER_FUNCTIONS = ("tasks.stages.ingest:ingest_chunk", "ssl_models.medical3d.dicom:series_headers",
                    "ssl_models.medical3d.shards:cube_chunk", "ssl_models.histopathology.shards:tile_chunk",
                    "ssl_models.audio.shards:audio_chunk")
HEAVY = ("datasets", "pyarrow", "monai", "torch")


@pytest.mark.parametrize("target", WORKER_FUNCTIONS)
def test_a_worker_function_loads_no_shard_writer_and_no_model_library(target: str) -> None:
    module, name = target.split(":")
    code = (f"import sys\nfrom {module} import {name}\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {target} loads {loaded}"
