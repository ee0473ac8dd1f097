"""The local backend: real child processes, their exit codes, output capture and signal forwarding."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from runner.backends import EXIT_CANCELLED, EnvironmentProblem, get_backend, plan_for
from runner.runs import RunStore
from runner.spec import load_job

JOB = "kind: train\nname: demo\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\n"

# A stand-in workload: prints, then waits for SIGTERM, "checkpoints" and exits 130 like the trainer does.
WORKLOAD = r"""
import os, signal, sys, time, pathlib
run = pathlib.Path(os.environ["RUNNER_RUN_DIR"])
def stop(signum, frame):
    (run / "checkpointed").write_text(str(signum))
    print("got signal", signum, flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print("started in", os.getcwd(), "job", os.environ["RUNNER_JOB"], flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
(run / "ready").write_text("1")
time.sleep(60)
"""


def start(tmp_path: Path, *args: str):  # type: ignore[no-untyped-def]
    f = tmp_path / "demo.yaml"
    f.write_text(JOB)
    job = load_job(f)
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    plan = dataclasses.replace(plan_for(job, workdir=str(tmp_path)), argv=["python", str(script), *args])
    run = RunStore().create(job, plan)
    backend = get_backend("local")
    return backend, run, backend.start(plan, run, attach=False)


def wait_for(path: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_exit_code_and_output_reach_the_run(tmp_path: Path) -> None:
    _, run, h = start(tmp_path, "exit", "7")
    assert h.wait() == 7
    log = run.log_path.read_text()
    assert f"started in {tmp_path} job demo" in log
    assert run.status()["backend_ref"]["pid"] > 0


def test_cancel_forwards_sigterm_and_the_job_checkpoints(tmp_path: Path) -> None:
    _, run, h = start(tmp_path, "wait")
    wait_for(run.dir / "ready")
    h.cancel()
    assert h.wait() == EXIT_CANCELLED
    assert (run.dir / "checkpointed").read_text() == "15"
    assert "got signal 15" in run.log_path.read_text()


def test_cancel_from_another_process_kills_after_grace(tmp_path: Path) -> None:
    backend, run, h = start(tmp_path, "ignore")
    wait_for(run.dir / "ready")
    t = time.monotonic()
    backend.cancel(run, grace_s=1.0)  # what `runner cancel` does, from the run's backend_ref alone
    code = h.wait()
    assert code == 128 + 9 and time.monotonic() - t < 15  # SIGKILL after the grace period


def test_gpu_job_without_a_device_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text(JOB + "resources: {gpus: 1}\nimage: rocm\n")
    plan = plan_for(load_job(f), backend="local")
    if Path("/dev/kfd").exists():
        pytest.skip("this machine has /dev/kfd")
    with pytest.raises(EnvironmentProblem, match="/dev/kfd"):
        get_backend("local").check(plan)


def test_python_is_this_interpreter(tmp_path: Path) -> None:
    from runner.backends.local import local_argv

    f = tmp_path / "demo.yaml"
    f.write_text(JOB)
    plan = plan_for(load_job(f))
    assert local_argv(plan, tmp_path)[0] == sys.executable
