"""Where the project, the run store and the model cache live; shared by the host side and the workloads."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PROJECT_ROOT / "templates"


def runner_home() -> Path:
    """$RUNNER_HOME (default `./.runner`): runs/ and registry/ live here."""
    return Path(os.environ.get("RUNNER_HOME", ".runner")).resolve()


def runner_cache() -> Path:
    """$RUNNER_CACHE (default `$RUNNER_HOME/cache`): offline base models and the Hugging Face cache."""
    if os.environ.get("RUNNER_CACHE"):
        return Path(os.environ["RUNNER_CACHE"]).resolve()
    return runner_home() / "cache"
