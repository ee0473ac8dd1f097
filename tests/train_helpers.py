"""Shared helpers for tests that run real training subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from runner.spec import job_from_data

REPO = Path(__file__).resolve().parents[1]


def tiny_job(name: str = "t", **over: Any) -> dict[str, Any]:
    """A train job small enough for tests: a 1-layer, 32-wide untrained tiny base, a few steps."""
    job: dict[str, Any] = {
        "name": name,
        "kind": "train",
        "model": {"base": "tiny", "tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "pretrain_steps": 0}},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [{"path": "builtin:categories", "topics": ["tools", "kitchen"], "limit": 240}],
                 "val_fraction": 0.1},
        "train": {"steps": 12, "batch_size": 2, "max_seq_len": 128, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 6, "save_every": 3, "log_every": 1, "threads": 1, "deterministic": True},
    }
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return job


def write_run_dir(run_dir: Path, job: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = job_from_data(job).spec
    (run_dir / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return run_dir


def train_env(run_dir: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RUNNER_RUN_DIR=str(run_dir), RUNNER_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_train(run_dir: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner.workloads"],
        cwd=REPO,
        env=train_env(run_dir, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_train(run_dir: Path, cache: Path, timeout: float = 600) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "runner.workloads"],
        cwd=REPO,
        env=train_env(run_dir, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stdout + p.stderr


def metrics(run_dir: Path, split: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if r["split"] == split]
