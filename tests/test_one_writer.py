"""A run has one writer: a runner killed with -9 leaves its trainer alive, and the next `runner run` stops that
trainer before it resumes; a second `runner run` of a job being driven is refused; two workloads never share a run
directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import start_train, tiny_job, write_run_dir

from runner.runs import Run
from tests.conftest import ROOT, run_cli
from tests.test_cli import job_file, run_dirs, status, wait_for

pytestmark = pytest.mark.slow


def _runner(f: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runner", "run", str(f)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _first_checkpoint(home: Path) -> bool:
    return (home / "runs" / "cli-demo").is_dir() and any(
        any((d / "checkpoints").glob("step-*")) for d in run_dirs(home))


def test_kill9_of_the_runner_then_run_again_stops_the_orphan_and_resumes(tmp_path: Path, runner_home: Path) -> None:
    f = job_file(tmp_path, steps=60)
    first = _runner(f)
    try:
        wait_for(lambda: _first_checkpoint(runner_home), 600, "a first checkpoint")
        first.kill()  # SIGKILL: the runner records nothing; its trainer (own process group) lives on
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    (run_dir,) = run_dirs(runner_home)
    run = Run(run_dir)
    holder = run.workload_holder()
    assert holder is not None and holder.startswith("pid "), holder
    assert status(run_dir)["state"] == "running"

    again = run_cli("run", str(f), timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "outlived its runner" in out and "the old workload stopped" in out and "resuming" in out, out
    assert run.workload_holder() is None
    assert len(run_dirs(runner_home)) == 1
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    moves = [(e["from"], e["to"]) for e in events if e["event"] == "state"]
    assert ("running", "running") not in moves, moves
    assert ("running", "cancelled") in moves and moves[-1] == ("running", "succeeded"), moves
    assert any(e["event"] == "orphan-stop" for e in events)
    # One trainer at a time: every logged step after the resume point is logged once, and steps only go forward.
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("split") == "train"]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), steps
    assert steps[-1] == 60


def test_a_second_runner_for_a_running_job_is_refused(tmp_path: Path, runner_home: Path) -> None:
    f = job_file(tmp_path, steps=400)
    first = _runner(f)
    try:
        wait_for(lambda: (runner_home / "runs" / "cli-demo").is_dir() and any(
            status(d).get("state") == "running" for d in run_dirs(runner_home) if (d / "status.json").exists()),
            300, "the first run to start")
        second = run_cli("run", str(f), timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is running now" in second.stderr and "--fresh" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert len(run_dirs(runner_home)) == 1
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()


def test_two_workloads_never_share_a_run_directory(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_dir = write_run_dir(tmp_path / "run", tiny_job(train={"steps": 400}))
    a = start_train(run_dir, cache)
    try:
        wait_for(lambda: Run(run_dir).workload_holder() is not None, 300, "the first trainer's lock")
        b = start_train(run_dir, cache)
        out, _ = b.communicate(timeout=120)
        assert b.returncode == 2, out
        assert "another workload of this run is still running (pid " in out, out
        assert "Traceback" not in out
    finally:
        a.kill()
        a.wait()
    assert Run(run_dir).workload_holder() is None  # the lock dies with its process
