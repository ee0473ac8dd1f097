"""Slurm backend: rendering and preflight as units, then submit/poll/cancel/requeue against the real cluster.

The cluster tests need a Slurm controller; as root they start the single-node one with .ci/slurm-up.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.backends import EnvironmentProblem, get_backend, plan_for
from runner.backends.slurm import (
    SlurmNode,
    gres_gpus,
    job_info,
    map_state,
    preflight,
    signal_lead_s,
    time_limit_s,
)
from runner.launch import multinode_argv
from runner.plan import Plan
from runner.runs import Run, RunStore
from runner.spec import job_from_data, load_job
from runner.spec.models import Resources
from tests.conftest import ROOT, run_cli

JOB_4NODE = ROOT / "jobs" / "train-72b-4node.yaml"

# A stand-in for the trainer with the same contract: resumes from the last complete checkpoint, checkpoints
# every 5 steps (temp name, then rename), and on SIGTERM saves a checkpoint and exits 130.
FAKE_TRAINER = r"""#!/usr/bin/env bash
set -u
ck="$RUNNER_RUN_DIR/checkpoints"
mkdir -p "$ck"
last=$(ls "$ck" | grep '^step-[0-9]*$' | sort | tail -n 1)
step=${last#step-}
step=$((10#${step:-0}))
echo "trainer: rank ${RUNNER_NODE_RANK} of ${RUNNER_NNODES} (master ${RUNNER_MASTER_ADDR}:${RUNNER_MASTER_PORT}) from step $step"
save() {
    d="$ck/step-$(printf %08d "$step")"
    [ -d "$d" ] && return
    mkdir -p "$d.tmp" && echo "$step" > "$d.tmp/state" && echo "{\"step\": $step}" > "$d.tmp/trainer_state.json" && sleep "${SAVE_S:-0}" && mv "$d.tmp" "$d"
}
trap 'echo "trainer: SIGTERM at step $step, saving"; save; echo "trainer: saved step $step"; exit 130' TERM
while [ "$step" -lt "$STEPS" ]; do
    sleep "$STEP_S" & wait $!
    step=$((step + 1))
    echo "step $step"
    [ $((step % 5)) = 0 ] && save
done
save
echo "trainer: done at step $step"
"""


# --- units: no cluster needed ------------------------------------------------------------------------


def _job(name: str = "slurm-unit", **resources: Any) -> Any:
    return job_from_data(
        {
            "kind": "prepare",
            "name": name,
            "backend": "slurm",
            "data": {"train": "builtin:mcq"},
            "resources": {"cpus": 1, "memory_gb": 1, **resources},
        }
    )


def test_states_map_to_run_states() -> None:
    assert map_state("PENDING", None) == ("pending", None)
    assert map_state("PENDING", None, restarts=1) == ("running", None)  # requeued: resumes later
    assert map_state("RUNNING", None) == ("running", None)
    assert map_state("COMPLETING", 0) == ("running", None)
    assert map_state("COMPLETED", 0) == ("succeeded", 0)
    assert map_state("FAILED", 130) == ("cancelled", 130)  # the workload checkpointed on SIGTERM
    assert map_state("FAILED", 1) == ("failed", 1)
    assert map_state("CANCELLED by 0", None) == ("cancelled", 130)
    assert map_state("TIMEOUT", None) == ("failed", 1)
    assert map_state("OUT_OF_MEMORY", 137) == ("failed", 137)


def test_time_limits_and_signal_lead() -> None:
    assert time_limit_s("30") == 1800 and time_limit_s("1:30") == 90 and time_limit_s("12:00:00") == 43200
    assert (
        time_limit_s("2-00") == 172800 and time_limit_s("1-02:03:04") == 93784 and time_limit_s(None) is None
    )
    assert signal_lead_s("12:00:00") == 120 and signal_lead_s(None) == 120 and signal_lead_s("00:01:00") == 15


def test_gres_gpu_counts() -> None:
    assert gres_gpus("(null)") == 0
    assert gres_gpus("gpu:8") == 8
    assert gres_gpus("gpu:mi300x:8(S:0-1)") == 8
    assert gres_gpus("nvme:1,gpu:a100:4") == 4


def test_preflight_refuses_more_nodes_than_the_partition_has() -> None:
    plan = plan_for(_job(nodes=2), "slurm")
    nodes = [SlurmNode("vm", ("debug*",), 2, 23000, 0, "idle")]
    with pytest.raises(EnvironmentProblem) as e:
        preflight(plan, nodes)
    msg = str(e.value)
    assert "resources.nodes=2" in msg and "'debug' has 1 node(s)" in msg and "wait forever" in msg
    preflight(plan_for(_job(nodes=1), "slurm"), nodes)  # one node fits


def _in_partition(plan: Plan, partition: str) -> Resources:
    res = plan.resources
    return res.model_copy(update={"slurm": res.slurm.model_copy(update={"partition": partition})})


def test_preflight_counts_gpus_and_skips_down_nodes() -> None:
    plan = plan_for(_job(nodes=2, gpus=8, cpus=None, memory_gb=None), "slurm")
    nodes = [
        SlurmNode("g1", ("gpu",), 128, 2_000_000, 8, "idle"),
        SlurmNode("g2", ("gpu",), 128, 2_000_000, 8, "down*"),
        SlurmNode("c1", ("cpu*",), 64, 500_000, 0, "idle"),
    ]
    with pytest.raises(EnvironmentProblem, match="partition 'cpu'"):
        preflight(plan, nodes)  # the default partition has no GPUs
    with pytest.raises(EnvironmentProblem, match="2 node\\(s\\), 1 up"):
        preflight(replace(plan, resources=_in_partition(plan, "gpu")), nodes)
    with pytest.raises(EnvironmentProblem, match="no partition 'big'"):
        preflight(replace(plan, resources=_in_partition(plan, "big")), nodes)


def test_multinode_argv_adds_rank_flags_once() -> None:
    argv = ["accelerate", "launch", "--config_file", "x.yaml", "-m", "runner.workloads"]
    out = multinode_argv(argv)
    assert out[:8] == [
        "accelerate",
        "launch",
        "--machine_rank",
        "${RUNNER_NODE_RANK}",
        "--main_process_ip",
        "${RUNNER_MASTER_ADDR}",
        "--main_process_port",
        "${RUNNER_MASTER_PORT}",
    ]
    assert multinode_argv(out) == out
    assert multinode_argv(["python", "-m", "runner.workloads"]) == ["python", "-m", "runner.workloads"]


def test_4node_plan_gives_each_node_its_rank() -> None:
    p = run_cli("plan", str(JOB_4NODE), "--backend", "slurm", check=True)
    out = p.stdout
    sbatch = out[out.index("# file: plan/sbatch.sh") :]
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
    ):
        assert line in sbatch
    assert "srun --nodes=4 --ntasks-per-node=1" in sbatch
    assert 'RUNNER_NODE_RANK="${SLURM_NODEID}"' in sbatch
    assert "scontrol show hostnames" in sbatch
    entry = out[out.index("# file: plan/entrypoint.sh") :]
    assert '--machine_rank "${RUNNER_NODE_RANK}" --main_process_ip "${RUNNER_MASTER_ADDR}"' in entry
    accel = out[out.index("# file: plan/accelerate.yaml") :]
    assert "num_machines: 4" in accel and "num_processes: 32" in accel and "FSDP" in accel


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    job = load_job(JOB_4NODE, [], "slurm")
    plan = plan_for(job, "slurm")
    for name in ("sbatch.sh", "entrypoint.sh"):
        f = tmp_path / name
        f.write_text(plan.files[name])
        subprocess.run(["bash", "-n", str(f)], check=True)


def test_secrets_stay_out_of_the_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    job = load_job(JOB_4NODE, [], "slurm")
    text = plan_for(job, "slurm").files["sbatch.sh"]
    assert "hf_secret_value" not in text
    assert "# HF_TOKEN: a secret" in text


def test_no_sbatch_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EnvironmentProblem, match="no Slurm client"):
        get_backend("slurm").check(plan_for(_job(), "slurm"))


# --- the real cluster --------------------------------------------------------------------------------


def _controller_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if _controller_answers():
        return
    up = ROOT / ".ci" / "slurm-up.sh"
    if os.geteuid() != 0:
        pytest.skip("no Slurm controller answers and starting one (.ci/slurm-up.sh) needs root")
    p = subprocess.run(["bash", str(up)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or not _controller_answers():
        pytest.skip(f"no Slurm cluster could be started: {p.stderr.strip()[-300:]}")


def _start_fake(
    name: str, steps: int, step_s: float, save_s: float = 0.0, time: str | None = None
) -> tuple[Plan, Run, Any]:
    job = job_from_data(
        {
            "kind": "prepare",
            "name": name,
            "backend": "slurm",
            "data": {"train": "builtin:mcq"},
            "resources": {"cpus": 1, "memory_gb": 1, "slurm": {"time": time}},
            "env": {"STEPS": str(steps), "STEP_S": str(step_s), "SAVE_S": str(save_s)},
        }
    )
    plan = plan_for(job, "slurm")
    plan = replace(plan, files={**plan.files, "entrypoint.sh": FAKE_TRAINER})
    backend = get_backend("slurm")
    backend.check(plan)
    run = RunStore().create(job, plan)
    run.set_state("running")
    handle = backend.start(plan, run, attach=False)
    return plan, run, handle


def _release_requeued(job_id: str, held_since: float) -> bool:
    """Let a requeued job start now instead of after Slurm's ~2-minute hold (Reason=BeginTime), once it is safe.

    When a job is requeued, slurmd revokes the first attempt's launch credential and refuses any credential of that
    job created in the same second or earlier ("Job credential revoked": the job then fails with exit 1). Slurm's
    hold is what normally keeps the restart clear of that; released early, the restart must still wait a moment.
    """
    if "BeginTime" not in (job_info(job_id) or {}).get("Reason", ""):
        return False
    time.sleep(max(0.0, held_since + 2.5 - time.monotonic()))
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)
    return True


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slurm
def test_submit_follow_and_succeed(slurm_cluster: None) -> None:
    _, run, handle = _start_fake("slurm-ok", steps=6, step_s=0.1)
    job_id = run.status()["backend_ref"]["slurm_job_id"]
    assert job_id.isdigit()
    assert handle.wait() == 0
    log = run.log_path.read_text()
    assert (
        f"slurm: job {job_id}" in log and "trainer: rank 0 of 1" in log and "trainer: done at step 6" in log
    )
    assert [c.name for c in run.checkpoints()] == ["step-00000005", "step-00000006"]
    assert get_backend("slurm").poll(run) == ("succeeded", 0)


@pytest.mark.slurm
def test_cancel_lets_the_workload_checkpoint_first(slurm_cluster: None) -> None:
    # Saving takes 3 s: the cancel must wait for it rather than kill the job mid-write.
    _, run, handle = _start_fake("slurm-cancel", steps=10_000, step_s=0.2, save_s=3)
    backend = get_backend("slurm")
    _wait_for(lambda: "step 7" in run.log_path.read_text(), 60, "the job to run")
    result: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: result.update(code=handle.wait()))
    waiter.start()
    backend.cancel(run, grace_s=30)  # as `runner cancel` does, from any process
    waiter.join(60)
    assert result.get("code") == 130
    assert backend.poll(run) == ("cancelled", 130)
    log = run.log_path.read_text()
    assert "asking the workload to checkpoint" in log and "trainer: saved step" in log
    saved = int(log.split("trainer: saved step ")[1].split()[0])
    last = run.checkpoints()[-1]
    assert last.name == f"step-{saved:08d}" and (last / "state").read_text().strip() == str(saved)
    assert not list(run.checkpoints_dir.glob("*.tmp"))


@pytest.mark.slurm
def test_requeue_resumes_from_the_last_checkpoint(slurm_cluster: None) -> None:
    _, run, handle = _start_fake("slurm-requeue", steps=30, step_s=0.3)
    job_id = run.status()["backend_ref"]["slurm_job_id"]
    _wait_for(lambda: (run.checkpoints_dir / "step-00000010").is_dir(), 60, "checkpoint 10")
    # What preemption does: the job is stopped and put back in the queue (the same job id).
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
    requeued_at = time.monotonic()
    # Slurm holds a requeued job back ~2 minutes (Reason=BeginTime); let it start again sooner.
    _wait_for(
        lambda: int((job_info(job_id) or {}).get("Restarts", "0") or 0) == 1, 30, "the job to be requeued"
    )
    assert get_backend("slurm").poll(run) == ("running", None)  # requeued, not ended
    _wait_for(lambda: _release_requeued(job_id, requeued_at), 30, "the requeued job to be held")
    code = handle.wait()
    log = run.log_path.read_text()
    assert code == 0, (job_info(job_id), log[-3000:])
    assert "(start 2)" in log, log[-2000:]
    resumed = int(log.split("from step ")[2].split()[0])
    assert resumed >= 10
    assert "trainer: done at step 30" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_checkpoints_requeues_and_finishes(slurm_cluster: None) -> None:
    # A 1-minute limit: Slurm signals the script (USR1) ahead of it, the workload checkpoints, the script
    # requeues the job, and the second start resumes from that checkpoint and finishes.
    _, run, handle = _start_fake("slurm-timelimit", steps=100, step_s=0.5, time="00:01:00")
    job_id = run.status()["backend_ref"]["slurm_job_id"]
    assert "#SBATCH --signal=B:USR1@15" in (run.plan_dir / "sbatch.sh").read_text()
    result: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: result.update(code=handle.wait()))
    waiter.start()
    end = time.monotonic() + 300
    requeued_at: dict[int, float] = {}  # restart count -> when this loop first saw it
    while waiter.is_alive() and time.monotonic() < end:
        # Slurm holds a requeued job back ~2 minutes (Reason=BeginTime); let it start again sooner. Slurm may send
        # the signal early (its timer ticks once a minute), so the job can be requeued more than once.
        restarts = int((job_info(job_id) or {}).get("Restarts", "0") or 0)
        if restarts >= 1:
            _release_requeued(job_id, requeued_at.setdefault(restarts, time.monotonic()))
        time.sleep(0.5)
    waiter.join(max(1.0, end - time.monotonic()))
    assert result.get("code") == 0
    log = run.log_path.read_text()
    saved = int(log.split("trainer: saved step ")[1].split()[0])
    assert "time-limit: asking the workload to checkpoint" in log
    assert "(start 2)" in log and f"from step {saved}" in log and "trainer: done at step 100" in log


@pytest.mark.slurm
def test_two_nodes_on_one_node_cluster_is_refused(slurm_cluster: None, tmp_path: Path) -> None:
    job = tmp_path / "two.yaml"
    job.write_text(
        "kind: prepare\nname: two-nodes\nbackend: slurm\ndata: {train: builtin:mcq}\nresources: {nodes: 2}\n"
    )
    t = time.monotonic()
    p = run_cli("run", str(job), timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "resources.nodes=2" in p.stderr and "has 1 node(s)" in p.stderr
    assert "Traceback" not in p.stderr
    assert time.monotonic() - t < 20
    assert not (Path(os.environ["RUNNER_HOME"]) / "runs" / "two-nodes").exists()  # nothing was submitted


QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
# The quickstart's shape, for a tree that does not have jobs/quickstart.yaml yet: the tiny offline model on the
# built-in MCQ set, a few LoRA steps on one CPU thread.
QUICKSTART_STANDIN = """kind: train
name: quickstart
model: {base: tiny}
data: {train: builtin:categories}
train: {steps: 20, eval_every: 10, save_every: 10, log_every: 5, threads: 1}
"""


def _quickstart(tmp_path: Path) -> str:
    if QUICKSTART.exists():
        return str(QUICKSTART)
    f = tmp_path / "quickstart.yaml"
    f.write_text(QUICKSTART_STANDIN)
    return str(f)


@pytest.mark.slurm
@pytest.mark.slow
def test_quickstart_through_slurm_succeeds(slurm_cluster: None, tmp_path: Path) -> None:
    p = run_cli("run", _quickstart(tmp_path), "--backend", "slurm", "--fresh", timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = RunStore().get("quickstart")
    st = run.status()
    assert st["state"] == "succeeded" and st["backend"] == "slurm" and st["exit_code"] == 0
    assert st["backend_ref"]["slurm_job_id"]
    assert run.checkpoints(), "the trainer wrote no checkpoint"
    log = run.log_path.read_text()
    assert f"slurm: job {st['backend_ref']['slurm_job_id']}" in log and "validation accuracy" in log
    assert "validation accuracy" in p.stdout  # followed to the terminal too


@pytest.mark.slurm
@pytest.mark.slow
def test_quickstart_cancel_through_slurm_ends_cancelled_with_checkpoint(
    slurm_cluster: None, tmp_path: Path
) -> None:
    args = [
        "--set",
        "train.steps=100000",
        "--set",
        "train.save_every=100000",
        "--set",
        "train.eval_every=100000",
    ]
    p = run_cli("run", _quickstart(tmp_path), "--backend", "slurm", "--fresh", "--detach", *args, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    run = RunStore().get("quickstart")
    _wait_for(
        lambda: run.log_path.exists() and re.search(r"step \d+/100000", run.log_path.read_text()) is not None,
        900,
        "training steps",
    )
    c = run_cli("cancel", run.id, "--grace", "120", timeout=300)
    assert c.returncode == 0, c.stdout + c.stderr
    assert run.state == "cancelled", run.status()
    assert run.status()["exit_code"] == 130
    log = run.log_path.read_text()
    assert "asking the workload to checkpoint" in log
    ckpts = run.checkpoints()
    assert len(ckpts) == 1, "cancel did not leave exactly one (final) checkpoint"
    assert (ckpts[-1] / "trainer_state.json").exists() and (ckpts[-1] / "adapter").is_dir()
