"""The run store: one directory per run under $RUNNER_HOME/runs/<job>/<run-id>/, its status state machine and lock.

Everything here is written atomically (temp file, fsync, rename), so an interrupted runner never leaves a torn
status.json; events.jsonl is append-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.spec import Job
from runner.files import atomic_write
from runner.paths import runner_home

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled"}),
    # A train run that did not finish can be resumed: it goes back to running.
    "failed": frozenset({"running"}),
    "cancelled": frozenset({"running"}),
    "succeeded": frozenset(),
}


# A job name or a run id: what a run reference may contain before it touches the file system.
REF_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunError(Exception):
    """A problem with the run store that the user must act on (unknown run, run locked, bad transition)."""


# timezone.utc, not datetime.UTC (3.11+): workloads in the Python 3.10 ROCm image import this module.
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")  # noqa: UP017




def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)  # noqa: UP017


# Held by a run's workload (its rank-0 process) for as long as it lives, beside `.lock`, which the runner driving
# the run holds: a runner killed with -9 leaves the workload running, and the next runner must see that.
WORKLOAD_LOCK = ".workload.lock"
_held: list[int] = []  # the workload's lock stays open until the process exits


def hold_workload_lock(run_dir: Path) -> None:
    """Take the run's workload lock for the rest of this process's life; RunError if another workload has it."""
    fd = os.open(run_dir / WORKLOAD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    end = time.monotonic() + 2  # a reader's probe holds it for microseconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < end:
                time.sleep(0.05)
                continue
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(f"another workload of this run is still running ({holder}); two would write the same "
                       "checkpoints. Stop it (`runner cancel RUN`) or wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
    _held.append(fd)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Run:
    def __init__(self, directory: Path):
        self.dir = directory
        self.id = directory.name
        self.job_name = directory.parent.name

    def __repr__(self) -> str:
        return f"Run({self.job_name}/{self.id})"

    @property
    def ref(self) -> str:
        return f"{self.job_name}/{self.id}"

    @property
    def log_path(self) -> Path:
        return self.dir / "run.log"

    @property
    def plan_dir(self) -> Path:
        return self.dir / "plan"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    def status(self) -> dict[str, Any]:
        """status.json; when it is damaged, the state as events.jsonl tells it (marked `rebuilt_from`; the next
        write of the run's state replaces the damaged file)."""
        path = self.dir / "status.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"state": "pending"}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"is unreadable ({e})"
        else:
            if isinstance(data, dict) and isinstance(data.get("state", "pending"), str):
                return data
            why = f"holds a JSON {type(data).__name__}, not an object" if not isinstance(data, dict) else \
                "has a state that is not a string"
        rebuilt = self.rebuilt_status()
        if rebuilt is None:
            raise RunError(f"{path} {why}, and {self.events_path.name} cannot rebuild it; remove the run with "
                           f"`rm -r {self.dir}`")
        rebuilt["rebuilt_from"] = f"{self.events_path.name} ({path.name} {why})"
        return rebuilt

    def rebuilt_status(self) -> dict[str, Any] | None:
        """The run's status replayed from events.jsonl (creation, then each state change with its fields), or
        None when there is no readable event. A torn last line is skipped."""
        st: dict[str, Any] = {}
        for e in self.events():
            if e.get("event") == "created":
                st.setdefault("state", "pending")
                st.update(created_at=e.get("time"), spec_hash=e.get("spec_hash"))
            elif e.get("event") == "state" and e.get("to") in STATES:
                st.update({k: v for k, v in e.items() if k not in ("event", "from", "to", "time")})
                st.update(state=e["to"], updated_at=e.get("time"))
        if not st:
            return None
        try:
            from ruamel.yaml import YAML

            st.setdefault("kind", YAML(typ="safe").load((self.dir / "job.yaml").read_text()).get("kind"))
        except Exception:  # noqa: BLE001 - the kind is a nicety; the state is what matters
            pass
        return st

    @property
    def state(self) -> str:
        return str(self.status().get("state", "pending"))

    def job_data(self) -> dict[str, Any]:
        from ruamel.yaml import YAML

        data = YAML(typ="safe").load((self.dir / "job.yaml").read_text())
        return dict(data or {})

    def events(self) -> Iterator[dict[str, Any]]:
        """The readable events of events.jsonl, oldest first; a torn or foreign line is skipped."""
        try:
            lines = self.events_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict):
                yield e

    def _event(self, event: dict[str, Any]) -> None:
        line = json.dumps({"time": now_iso(), **event}, sort_keys=True) + "\n"
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def update(self, **fields: Any) -> dict[str, Any]:
        st = self.status()
        st.pop("rebuilt_from", None)
        st.update(fields)
        atomic_write(self.dir / "status.json", json.dumps(st, indent=2, sort_keys=True) + "\n")
        return st

    def set_state(self, state: str, **fields: Any) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        st = self.status()
        cur = st.get("state", "pending")
        if state != cur and state not in TRANSITIONS[cur]:
            raise RunError(f"run {self.ref} cannot go from {cur} to {state}")
        t = now_iso()
        fields.setdefault("updated_at", t)
        if state == "running":
            fields.setdefault("started_at", t)
            fields.setdefault("ended_at", None)
        if state in TERMINAL:
            fields.setdefault("ended_at", t)
        self._event({"event": "state", "from": cur, "to": state, **{k: v for k, v in fields.items() if k != "updated_at"}})
        self.update(state=state, **fields)

    def note(self, event: str, **fields: Any) -> None:
        """Record something that happened (resume, cancel request, orphan found) without changing state."""
        self._event({"event": event, **fields})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock: one process drives a run at a time."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"run {self.ref} is being driven by another runner process "
                    f"(pid {self.status().get('runner_pid')}); use `runner logs -f {self.id}` to follow it"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)

    def _lock_holder(self, name: str) -> str | None:
        """What the holder of lock file `name` wrote there ("" if nothing), or None when no process holds it.
        Read-only: a lock that was never taken has no file, and none is created."""
        try:
            fd = os.open(self.dir / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 200).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return None

    def is_locked(self) -> bool:
        """Whether a process holds the run's lock (a runner drives it)."""
        return self._lock_holder(".lock") is not None

    def workload_holder(self) -> str | None:
        """`pid N on HOST` of the workload that holds this run's workload lock, or None. Read-only."""
        holder = self._lock_holder(WORKLOAD_LOCK)
        return None if holder is None else holder or "a process"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: step-* directories whose last file, trainer_state.json, exists."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step-*")
                      if p.is_dir() and not p.is_symlink() and (p / "trainer_state.json").is_file())

    def metrics(self) -> list[dict[str, Any]]:
        out = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def _creation_order(run: Run) -> tuple[str, str]:
    # Ids sort by the second they were made; within one second the recorded creation time decides.
    try:
        created = str(run.status().get("created_at", ""))
    except RunError:
        created = ""
    return (run.id[:15], created)


class RunStore:
    def __init__(self, home: Path | None = None):
        self.home = (home or runner_home()).resolve()
        self.runs_dir = self.home / "runs"

    def create(self, job: Job, plan: Plan | None = None) -> Run:
        """A new run directory with the resolved spec and the rendered plan files."""
        from ruamel.yaml import YAML

        d = self.runs_dir / job.name / new_run_id()
        while d.exists():  # same second, same random suffix: extremely unlikely, but never reuse a directory
            d = self.runs_dir / job.name / new_run_id()
        tmp = d.with_name(f".{d.name}.tmp")
        tmp.mkdir(parents=True)
        data = job.stored_data()  # `${env:...}` values stay templates: no secret reaches the disk
        data["spec_hash"] = job.spec_hash
        yaml = YAML()
        yaml.default_flow_style = False
        import io

        buf = io.StringIO()
        yaml.dump(data, buf)
        (tmp / "job.yaml").write_text(buf.getvalue())
        if plan is not None:
            for rel, content in plan.files.items():
                f = tmp / "plan" / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(content)
                if rel.endswith(".sh"):
                    f.chmod(0o755)
        atomic_write(
            tmp / "status.json",
            json.dumps({"state": "pending", "created_at": now_iso(), "spec_hash": job.spec_hash,
                        "kind": job.kind, "backend": plan.backend if plan else None}, indent=2, sort_keys=True) + "\n",
        )
        os.replace(tmp, d)
        run = Run(d)
        run.note("created", spec_hash=job.spec_hash, source=str(job.source))
        return run

    def refresh_plan(self, run: Run, plan: Plan) -> None:
        for rel, content in plan.files.items():
            f = run.plan_dir / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(f, content)
            if rel.endswith(".sh"):
                f.chmod(0o755)

    def list(self, job_name: str | None = None) -> list[Run]:
        if not self.runs_dir.is_dir():
            return []
        dirs = [self.runs_dir / job_name] if job_name else sorted(self.runs_dir.iterdir())
        runs = []
        for jd in dirs:
            if jd.is_dir():
                runs += [Run(p) for p in jd.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(runs, key=_creation_order)

    def get(self, ref: str) -> Run:
        """A run by id, `job/id`, a unique id prefix, or a job name (its latest run)."""
        if not all(REF_PART_RE.fullmatch(part) for part in ref.split("/", 1)):
            raise RunError(
                f"{ref!r} is not a run reference: use a run id, JOB/RUN-ID or a job name "
                "(letters, digits, '.', '_', '-'; no '..', no other '/')"
            )
        if "/" in ref:
            job, rid = ref.split("/", 1)
            d = self.runs_dir / job / rid
            if d.is_dir():
                return Run(d)
        runs = self.list()
        exact = [r for r in runs if r.id == ref]
        if exact:
            return exact[0]
        by_job = [r for r in runs if r.job_name == ref]
        if by_job:
            return by_job[-1]
        pref = [r for r in runs if r.id.startswith(ref)]
        if len(pref) == 1:
            return pref[0]
        if len(pref) > 1:
            raise RunError(f"run id prefix {ref!r} is ambiguous: {', '.join(r.ref for r in pref[:5])}")
        raise RunError(f"no run {ref!r} under {self.runs_dir}; `runner ls` lists the runs")

    def find_resumable(self, job: Job) -> Run | None:
        """The latest run of this exact spec that did not finish (failed or cancelled, or orphaned)."""
        for run in reversed(self.list(job.name)):
            st = run.status()
            if st.get("spec_hash") != job.spec_hash:
                continue
            state = st.get("state")
            if state == "succeeded":
                return None
            if state in ("failed", "cancelled"):
                return run
            if state in ("running", "pending") and run.is_locked():
                raise RunError(f"{run.ref} of this job is running now (runner pid {st.get('runner_pid')}); "
                               f"follow it with `runner logs -f {run.id}`, stop it with `runner cancel {run.id}`, "
                               "or pass --fresh to start a second run beside it")
            if state in ("running", "pending"):
                return run  # orphaned: its runner died without recording an end
        return None

    def remove(self, run: Run) -> None:
        shutil.rmtree(run.dir)


def wait_for_state(run: Run, states: set[str], timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = run.state
        if s in states:
            return s
        time.sleep(0.2)
    return run.state
