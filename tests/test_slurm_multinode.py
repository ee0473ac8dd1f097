"""Two Slurm nodes on this machine, for real: `.ci/multinode-up.sh` adds the partition `multi` (node1, node2, each a
slurmd in its own network namespace with its own address). A train job with resources.nodes: 2 goes through the
project's own sbatch script (srun, one task per node, each an `accelerate launch` that meets the other at node1's
address) and trains on 2 nodes x 2 CPU ranks over gloo with the losses of one process at the same global batch.
A `scancel` leaves a complete checkpoint; `runner run` resubmits and resumes it, Slurm requeues it mid-run, and the
finished run's per-step losses equal the uninterrupted single-process ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, run_cli
from train_helpers import metrics, tiny_job

from runner.backends import plan_for
from runner.files import sha256_file
from runner.spec import load_job

pytestmark = [pytest.mark.slurm_multinode, pytest.mark.slow]

PARTITION = "multi"
NODES, PROCESSES = 2, 2
WORLD = NODES * PROCESSES
STEPS = 60
SAVE_EVERY = 5
TOL = 1e-5  # metrics keep 6 decimals; measured: the 4-rank and 1-process losses differ by at most 2e-6


def _partition_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-N", "-o", "%N %t"], capture_output=True, text=True,
                           timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
    return p.returncode == 0 and len(states) == NODES and all(s in ("idle", "mix", "alloc") for s in states.values())


@pytest.fixture(scope="module")
def cluster() -> None:
    if _partition_ready():
        return
    if os.geteuid() != 0:
        pytest.skip(f"no Slurm partition {PARTITION!r} with {NODES} nodes, and starting one (.ci/multinode-up.sh) "
                    "needs root")
    p = subprocess.run(["bash", str(ROOT / ".ci" / "multinode-up.sh")], capture_output=True, text=True, timeout=300)
    # As root (CI) the cluster must come up: a failure here is a failure, never a skip.
    assert p.returncode == 0 and _partition_ready(), p.stdout + p.stderr


def _job(tmp: Path, name: str, ranks: int) -> Path:
    # The same global batch: 4 rows a step, as 1 process x 4 rows or 2 nodes x 2 ranks x 1 row.
    job = tiny_job(name, train={"steps": STEPS, "batch_size": 4 // ranks, "save_every": SAVE_EVERY,
                                "eval_every": 10})
    if ranks > 1:
        job["backend"] = "slurm"
        job["resources"] = {"nodes": NODES, "processes": PROCESSES, "slurm": {"partition": PARTITION}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _run_dir(home: Path, name: str) -> Path:
    (d,) = sorted((home / "runs" / name).iterdir())
    return d


def _losses(run_dir: Path) -> dict[int, float]:
    rows = metrics(run_dir, "train")
    assert len(rows) == len({r["step"] for r in rows}), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def _wait(pred: Any, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        assert proc is None or proc.poll() is None, f"the run ended while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _slurm_job(run_dir: Path) -> str:
    return str(json.loads((run_dir / "status.json").read_text())["backend_ref"]["slurm_job_id"])


def _job_field(job_id: str, key: str) -> str:
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10)
    for word in p.stdout.split():
        k, _, v = word.partition("=")
        if k == key:
            return v
    return ""


def _runner(job: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job as one local process (4 rows a step), uninterrupted."""
    tmp = tmp_path_factory.mktemp("one")
    home = tmp / "home"
    run_cli("run", str(_job(tmp, "one", 1)), env={"RUNNER_HOME": str(home), "OMP_NUM_THREADS": "1"}, check=True)
    return _run_dir(home, "one")


@pytest.fixture(scope="module")
def interrupted(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-node run, stopped three times: a plain `scancel` (then `runner run` resubmits it), `scontrol requeue`
    (Slurm restarts the same job) and `runner cancel` (then `runner run` resubmits it again). Returns what each
    phase printed and how long it took."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    home = tmp / "home"
    job = _job(tmp, "two-nodes", WORLD)
    env = dict(os.environ, RUNNER_HOME=str(home), OMP_NUM_THREADS="1")
    out: dict[str, Any] = {"times": {}}
    t = out["times"]

    # 1. submit, train to a checkpoint, scancel: Slurm sends SIGTERM to every task
    t0 = time.monotonic()
    proc = _runner(job, env)
    ckpts = home / "runs" / "two-nodes"
    _wait(lambda: list(ckpts.glob(f"*/checkpoints/step-{SAVE_EVERY:08d}")), 300, "the first checkpoint", proc)
    t["submit_to_first_checkpoint_s"] = time.monotonic() - t0
    run_dir = _run_dir(home, "two-nodes")
    first_job = _slurm_job(run_dir)
    t1 = time.monotonic()
    subprocess.run(["scancel", first_job], check=True, capture_output=True, timeout=10)
    out["cancel_out"], _ = proc.communicate(timeout=120)
    t["scancel_to_exit_s"] = time.monotonic() - t1
    out["cancel_code"] = proc.returncode
    out["cancel_state"] = json.loads((run_dir / "status.json").read_text())["state"]
    out["cancel_log"] = (run_dir / "run.log").read_text()
    out["checkpoints_after_cancel"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    stopped = int(out["cancel_log"].split("stopped by signal 15 at step ")[1].split(";")[0])
    out["stopped_at"] = stopped
    # Read now: the checkpoints the resumed run writes later replace the older ones (train.keep_checkpoints).
    ck = run_dir / "checkpoints" / f"step-{stopped:08d}"
    out["stop_checkpoint"] = ck.name
    out["stop_manifest_ok"] = _manifest_ok(ck)
    out["stop_state"] = json.loads((ck / "trainer_state.json").read_text())
    out["stop_files"] = {p.name for p in ck.iterdir()}

    # 2. `runner run` again: the same run, a new Slurm job, resumed from that checkpoint; then Slurm requeues it
    t2 = time.monotonic()
    proc = _runner(job, env)
    later = _next_save(stopped) + SAVE_EVERY
    _wait(lambda: (run_dir / "checkpoints" / f"step-{later:08d}").is_dir(), 300, f"checkpoint {later}", proc)
    t["resubmit_to_checkpoint_s"] = time.monotonic() - t2
    second_job = _slurm_job(run_dir)
    t3 = time.monotonic()
    subprocess.run(["scontrol", "requeue", second_job], check=True, capture_output=True, timeout=10)
    _wait(lambda: _job_field(second_job, "Restarts") == "1", 60, "the requeue")
    # Slurm holds a requeued job back ~2 minutes (Reason=BeginTime). Release it sooner, but not within the second
    # slurmd revoked the first attempt's launch credential in (see docs/scaling.md).
    _wait(lambda: "BeginTime" in _job_field(second_job, "Reason"), 120, "the requeued job to be held")
    time.sleep(2.5)
    subprocess.run(["scontrol", "update", f"JobId={second_job}", "StartTime=now"], check=True, capture_output=True,
                   timeout=10)

    # 3. once the requeued start has saved again, `runner cancel` (USR2 to the batch script, which asks for SIGTERM)
    log = run_dir / "run.log"
    _wait(lambda: f"job {second_job} on node[1-2] (start 2)" in log.read_text(), 300, "the restart", proc)
    requeue_stop = int(log.read_text().split("stopped by signal 15 at step ")[2].split(";")[0])
    after = _next_save(requeue_stop)
    _wait(lambda: (run_dir / "checkpoints" / f"step-{after:08d}").is_dir(), 300, f"checkpoint {after}", proc)
    t["requeue_to_resumed_checkpoint_s"] = time.monotonic() - t3
    t4 = time.monotonic()
    out["runner_cancel"] = run_cli("cancel", "two-nodes", env={"RUNNER_HOME": str(home)}, timeout=120)
    out["runner_cancel_out"], _ = proc.communicate(timeout=120)
    t["runner_cancel_to_exit_s"] = time.monotonic() - t4
    out["runner_cancel_code"] = proc.returncode
    out["runner_cancel_status"] = json.loads((run_dir / "status.json").read_text())

    # 4. `runner run` once more: resumed again, to the end
    t5 = time.monotonic()
    proc = _runner(job, env)
    out["final_out"], _ = proc.communicate(timeout=600)
    t["last_resubmit_to_end_s"] = time.monotonic() - t5
    t["total_s"] = time.monotonic() - t0
    out.update(final_code=proc.returncode, run_dir=run_dir, jobs=(first_job, second_job), later=later,
               requeue_stop=requeue_stop, final_log=log.read_text())
    print("two-node wall times:", json.dumps({k: round(v, 1) for k, v in t.items()}))
    return out


def _next_save(step: int) -> int:
    return step // SAVE_EVERY * SAVE_EVERY + SAVE_EVERY


def _manifest_ok(ckpt: Path) -> bool:
    """Every file the checkpoint's manifest lists has the size and sha256 it records (a complete checkpoint)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return bool(manifest["files"]) and all(
        (ckpt / rel).stat().st_size == f["size"] and sha256_file(ckpt / rel) == f["sha256"]
        for rel, f in manifest["files"].items()
    )


def test_the_job_renders_two_nodes_of_two_cpu_ranks(tmp_path: Path) -> None:
    files = plan_for(load_job(_job(tmp_path, "plan", WORLD), [], None), "slurm").files
    sbatch = files["sbatch.sh"]
    assert "2 node(s) x 2 CPU rank(s)" in sbatch
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", f"#SBATCH --partition={PARTITION}",
                 "#SBATCH --requeue", "srun --nodes=2 --ntasks-per-node=1", 'RUNNER_NODE_RANK="${SLURM_NODEID}"'):
        assert line in sbatch
    assert "--gpus-per-node" not in sbatch and "NCCL" not in sbatch  # CPU ranks: gloo, no GPU settings
    assert '--machine_rank "${RUNNER_NODE_RANK}" --main_process_ip "${RUNNER_MASTER_ADDR}"' in files["entrypoint.sh"]
    accel = yaml.safe_load(files["accelerate.yaml"])
    assert accel["num_machines"] == 2 and accel["num_processes"] == WORLD and accel["use_cpu"] is False


def test_two_nodes_train_with_the_losses_of_one_process(interrupted: dict[str, Any], reference: Path) -> None:
    log = interrupted["final_log"]
    # Every start placed two ranks on each node, which met at node1's address (not a loopback one).
    assert log.count(f"ranks: {WORLD} on 2 node(s) (node1 x2, node2 x2), backend gloo") == 4, log
    assert "slurm: rendezvous node1:" in log and "(address 10.77.0.11)" in log, log
    assert "on node[1-2]" in log
    got, want = _losses(interrupted["run_dir"]), _losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))  # no step missing or run twice
    diff = max(abs(got[s] - want[s]) for s in want)
    assert diff <= TOL, (diff, got, want)
    accuracy = {r["step"]: r["accuracy"] for r in metrics(interrupted["run_dir"], "val")}
    assert accuracy == {r["step"]: r["accuracy"] for r in metrics(reference, "val")}


def test_scancel_leaves_a_complete_checkpoint(interrupted: dict[str, Any]) -> None:
    assert interrupted["cancel_code"] == 130, interrupted["cancel_out"][-3000:]
    assert interrupted["cancel_state"] == "cancelled"
    assert interrupted["times"]["scancel_to_exit_s"] < 60  # KillWait is 30 s: it saved well before SIGKILL
    assert "Traceback" not in interrupted["cancel_out"] and "\ninterrupted\n" not in interrupted["cancel_log"]
    stopped = interrupted["stopped_at"]
    assert SAVE_EVERY <= stopped < STEPS
    assert interrupted["stop_checkpoint"] in interrupted["checkpoints_after_cancel"]
    assert not [n for n in interrupted["checkpoints_after_cancel"] if n.startswith(".tmp")]
    assert interrupted["stop_manifest_ok"]
    state = interrupted["stop_state"]
    assert state["step"] == stopped and state["world_size"] == WORLD
    # Each rank, on either node, saved its own optimizer and RNG state.
    assert {f"{k}.rank{r}.pt" for k in ("optimizer", "rng") for r in range(WORLD)} <= interrupted["stop_files"]


def test_runner_cancel_stops_both_nodes_at_a_checkpoint(interrupted: dict[str, Any]) -> None:
    assert interrupted["runner_cancel"].returncode == 0, interrupted["runner_cancel"].stderr
    # The launcher ends 143 on the SIGTERM it forwards; the script reports the workload's 130 (checkpointed).
    assert interrupted["runner_cancel_code"] == 130, interrupted["runner_cancel_out"][-3000:]
    st = interrupted["runner_cancel_status"]
    assert st["state"] == "cancelled" and st["exit_code"] == 130
    assert "slurm: cancel: asking the workload to checkpoint and stop" in interrupted["final_log"]


def test_resubmitted_and_requeued_run_resumes_exactly(interrupted: dict[str, Any]) -> None:
    out, log = interrupted["final_out"], interrupted["final_log"]
    assert interrupted["final_code"] == 0, out[-3000:]
    assert f"runner: resuming two-nodes/{interrupted['run_dir'].name}" in out  # the same run, resubmitted
    first, second = interrupted["jobs"]
    assert first != second
    assert f"slurm: job {second} on node[1-2] (start 2)" in log  # requeued by Slurm: the same job again
    stops = [int(part.split(";")[0]) for part in log.split("stopped by signal 15 at step ")[1:]]
    resumed = [int(part.split()[0]) for part in log.split("resuming from step ")[1:]]
    assert len(stops) == 3 and resumed == stops, (stops, resumed)  # each start resumed where the last stopped
    assert stops[0] == interrupted["stopped_at"] and stops[1] >= interrupted["later"]
    st = json.loads((interrupted["run_dir"] / "status.json").read_text())
    assert st["state"] == "succeeded" and st["exit_code"] == 0


def test_the_same_stop_signal_twice_still_checkpoints(tmp_path: Path) -> None:
    # What a rank gets from `scancel` under srun + accelerate launch: SIGTERM from Slurm (to every process of the
    # step) and again from the launcher. The second must not turn into "stop now, without a checkpoint". No
    # cluster needed: one local trainer, signalled a second time as soon as it has taken the first.
    import signal
    import threading

    from train_helpers import start_train, write_run_dir

    # Wide enough (~0.1 s a step) that the second signal lands before the step and its checkpoint are done.
    job = tiny_job(train={"steps": 2000, "save_every": 5, "eval_every": 1000, "batch_size": 8})
    job["model"]["tiny"].update(hidden_size=256, layers=2, heads=4)
    run_dir = write_run_dir(tmp_path / "run", job)
    proc = start_train(run_dir, Path(os.environ["RUNNER_CACHE"]))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")) if proc.stdout else None)
    reader.start()
    try:
        _wait(lambda: (run_dir / "checkpoints" / f"step-{SAVE_EVERY:08d}").is_dir(), 300, "a checkpoint", proc)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: any("received a stop request" in ln for ln in lines), 60, "the first signal's handler")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    out = "".join(lines)
    assert "\ninterrupted\n" not in out and "Traceback" not in out, out[-2000:]
    assert proc.returncode == 130, out[-2000:]
    stopped = int(out.split("stopped by signal 15 at step ")[1].split(";")[0])
    assert stopped < 2000 and _manifest_ok(run_dir / "checkpoints" / f"step-{stopped:08d}")
