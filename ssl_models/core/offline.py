"""The one source of the offline settings: no hub downloads, no telemetry, no update checks.

Applied by the CLI, the Prefect flow and the test suite, and passed to every process they start.
The same settings are kept where each tool reads them without this module: `.dvc/config`
(`core.analytics = false`, `core.check_update = false`, `studio.offline = true`) for a plain
`dvc ...` call, and the environment for a Prefect server started on its own:

    eval "$(python -m ssl_models.core.offline)"   # export these settings into the shell
    prefect server start                           # no analytics, no update checks

(or the same lines in the `[server]` section of a `prefect.toml` in the project root, which
Prefect reads from the working directory).
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "1", "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set every offline variable the user has not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def shell_exports() -> str:
    """`export NAME=value` lines for a shell (what `python -m ssl_models.core.offline` prints)."""
    return "\n".join(f"export {key}={value}" for key, value in OFFLINE_ENV.items())


if __name__ == "__main__":
    print(shell_exports())
