"""The one source of the offline settings: no hub downloads, no telemetry, no update checks.

Applied by the CLI, the Prefect flow and the test suite, and passed to every process they start."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set every offline variable the user has not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
