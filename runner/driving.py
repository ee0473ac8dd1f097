"""Driving a run: start it on its backend, wait, record how it ended; and take over an unfinished run safely.

A run has one writer at a time. The runner driving it holds `.lock`; its workload holds `.workload.lock` for as
long as it lives (runs.hold_workload_lock). A runner killed with -9 leaves its workload running: before a resume,
`stop_orphan` asks that workload to checkpoint and stop, waits until its lock is free, and records its end.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run

ORPHAN_GRACE_S = 60.0  # time an orphaned trainer gets to write its checkpoint before it is killed


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _orphan_alive(r: Run) -> str | None:
    """Who is still running this run's workload (its lock holder, or what its backend sees), or None."""
    from runner.backends import poll_run

    holder = r.workload_holder()
    if holder is not None:
        return holder
    seen = poll_run(r)
    return "its job, as its backend reports" if seen is not None and seen[0] == "running" else None


def stop_orphan(r: Run, grace_s: float = ORPHAN_GRACE_S) -> None:
    """With the run's lock held: make sure no workload of `r` is alive, stopping one its dead runner left behind.

    Raises EnvironmentProblem when it is still alive after the grace period and a kill."""
    from runner.backends import EnvironmentProblem, get_backend

    who = _orphan_alive(r)
    if who is None:
        return
    st = r.status()
    backend = str(st.get("backend") or "local")
    _say(f"runner: {r.ref}: a workload of this run outlived its runner ({who}); asking it to checkpoint and stop "
         f"(up to {grace_s:.0f} s) before resuming")
    r.note("orphan-stop", holder=who)
    t0 = time.monotonic()
    get_backend(backend).cancel(r, grace_s=grace_s)
    while _orphan_alive(r) is not None and time.monotonic() - t0 < grace_s + 15:
        time.sleep(0.2)
    left = _orphan_alive(r)
    if left is not None:
        raise EnvironmentProblem(f"{r.ref}: its old workload ({left}) is still running after {grace_s + 15:.0f} s; "
                                 f"stop it by hand (`runner cancel {r.id} --grace 0`), then run the job again")
    _say(f"runner: {r.ref}: the old workload stopped after {time.monotonic() - t0:.1f} s")
    if r.status().get("state") == "running":
        r.set_state("cancelled", exit_code=None, error="its runner died; the workload it left was stopped to resume")


def drive_locked(r: Run, p: Plan, attach: bool) -> int:
    """Start the plan on its backend for run `r` (whose lock the caller holds), wait, and record how it ended.

    EnvironmentProblem from the backend propagates after the run is marked failed."""
    from runner.backends import EXIT_CANCELLED, EnvironmentProblem, get_backend

    backend = get_backend(p.backend)
    r.set_state("running", runner_pid=os.getpid(), backend=p.backend, cancel_requested=False, exit_code=None)
    try:
        handle = backend.start(p, r, attach)
    except EnvironmentProblem as e:
        r.set_state("failed", error=str(e))
        raise
    signals = {"n": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["n"] += 1
        r.update(cancel_requested=True)
        if signals["n"] == 1:
            _say(f"\nrunner: {signal.Signals(signum).name}: stopping {r.ref} (checkpoint first; again to force)")
            r.note("cancel-requested", signal=signal.Signals(signum).name)
            handle.cancel()
        else:
            _say("runner: forcing stop")
            backend.cancel(r, grace_s=0)

    from runner.tracking import Follower

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    with Follower(r):  # MLflow, when the job turns it on: sent from here, so the workload never waits on it
        try:
            code = handle.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        st = r.status()
        if code == 0:
            state = "succeeded"
        elif st.get("cancel_requested") or code == EXIT_CANCELLED:
            state = "cancelled"
        else:
            state = "failed"
        r.set_state(state, exit_code=code)
    if attach:
        _say(f"runner: {r.ref} {state} (exit {code})")
    return code
