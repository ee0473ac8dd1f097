"""Shared fixtures: an isolated RUNNER_HOME per test and a way to call the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MMLU = SHARED / "data" / "mmlu"


@pytest.fixture(autouse=True)
def runner_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "runner-home"
    monkeypatch.setenv("RUNNER_HOME", str(home))
    # The tiny base model is expensive to build; share its cache across tests (it is keyed by its settings).
    monkeypatch.setenv("RUNNER_CACHE", os.environ.get("RUNNER_TEST_CACHE", str(ROOT / ".runner" / "cache")))
    return home


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """`runner ARGS...` in a subprocess, as a user types it."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                       timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"runner {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p
