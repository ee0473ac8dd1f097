"""What runs inside the images must run on their Python: the pinned ROCm base ships 3.10."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_workloads_specs_and_agents_need_at_most_python_3_10() -> None:
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (it comes with the dev extra: just bootstrap)")
    p = subprocess.run(
        [vermin, "-t=3.10-", "--no-tips", "--eval-annotations", "--violations",
         "runner/workloads", "runner/spec", "agents",
         # host modules the workloads import (run store, registry lookups, statistics)
         "runner/runs.py", "runner/registry", "runner/stats.py", "runner/paths.py", "runner/files.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Minimum required versions: 3.10" in p.stdout
