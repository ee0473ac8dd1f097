"""The runner as a user drives it: run, ls, show, logs, Ctrl-C, resume, cancel from another terminal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

JOB = """\
kind: train
name: cli-demo
model:
  base: tiny
data:
  train: builtin:categories?per_topic=60&topics=tools,clothing
  val_fraction: 0.2
train:
  steps: {steps}
  batch_size: 16
  lr: 3.0e-3
  eval_every: 20
  save_every: 5
  log_every: 5
  threads: 1
"""


def job_file(tmp_path: Path, steps: int = 30) -> Path:
    p = tmp_path / "cli-demo.yaml"
    p.write_text(JOB.format(steps=steps))
    return p


def run_dirs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "runs" / "cli-demo").iterdir() if p.is_dir())


def status(run: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((run / "status.json").read_text())


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_run_ls_show_logs(tmp_path: Path, runner_home: Path) -> None:
    f = job_file(tmp_path, steps=20)
    p = run_cli("run", str(f), timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    (run,) = run_dirs(runner_home)
    assert status(run)["state"] == "succeeded" and status(run)["exit_code"] == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if m["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 20 and 0.0 <= val[-1]["accuracy"] <= 1.0
    assert all({"step", "loss", "lr", "tokens_per_s"} <= m.keys() for m in metrics if m["split"] == "train")
    assert (run / "checkpoints" / "step-00000020").is_dir()
    assert "run.log" in os.listdir(run) and "step" in (run / "run.log").read_text()

    ls = run_cli("ls", check=True).stdout
    assert run.name in ls and "succeeded" in ls
    show = run_cli("show", run.name, check=True).stdout
    assert "state      succeeded" in show and "val acc" in show and "step-00000020" in show
    assert (run / "loss.png").stat().st_size > 1000 and (run / "accuracy.png").exists()
    logs = run_cli("logs", "cli-demo", check=True).stdout
    assert logs == (run / "run.log").read_text()
    # A second run of the same finished spec starts a new run instead of resuming.
    assert run_cli("run", str(f), "--set", "train.steps=20", timeout=900).returncode == 0
    assert len(run_dirs(runner_home)) == 2


def test_ctrl_c_cancels_with_a_complete_checkpoint_then_resumes(tmp_path: Path, runner_home: Path) -> None:
    f = job_file(tmp_path, steps=400)
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(f)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (runner_home / "runs" / "cli-demo").is_dir() and any(
            any((d / "checkpoints").glob("step-*")) for d in run_dirs(runner_home)), 600, "a first checkpoint")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the runner
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    (run,) = run_dirs(runner_home)
    assert status(run)["state"] == "cancelled"
    cks = sorted((run / "checkpoints").glob("step-*"))
    assert cks and not list((run / "checkpoints").glob(".tmp*"))
    last = cks[-1]
    # The checkpoint loads: the adapter is a PEFT directory with weights and config.
    assert (last / "adapter" / "adapter_config.json").exists() or (last / "adapter_config.json").exists()
    step = int(last.name.split("-")[1])
    assert 0 < step < 400

    # Running the same job again resumes that run from its last checkpoint.
    proc2 = subprocess.Popen([sys.executable, "-m", "runner", "run", str(f)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "resuming from step" in (run / "run.log").read_text(), 300, "the resume message")
        # `runner cancel` from another terminal stops it the same way.
        c = run_cli("cancel", run.name, "--grace", "60", timeout=120)
        assert c.returncode == 0 and "cancelled" in c.stdout, c.stdout + c.stderr
        out2, _ = proc2.communicate(timeout=120)
    finally:
        if proc2.poll() is None:
            proc2.kill()
    assert f"resuming {run.parent.name}/{run.name}" in out2
    assert status(run)["state"] == "cancelled" and len(run_dirs(runner_home)) == 1
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("resume") == 1


def test_train_72b_fails_fast_here() -> None:
    if Path("/dev/kfd").exists():
        pytest.skip("this machine has an AMD GPU")
    t = time.monotonic()
    p = run_cli("run", str(ROOT / "jobs" / "train-72b.yaml"), timeout=60)
    assert p.returncode == 3 and time.monotonic() - t < 10
    assert "/dev/kfd" in p.stderr and "Traceback" not in p.stderr
