"""Slurm backend: the plan as an sbatch script (one srun task per node), followed through squeue/scontrol.

The batch script writes straight into the run's run.log (`sbatch --output`), so the log keeps growing when no
runner process follows it; `runner cancel` signals the script, which asks the workload to checkpoint first.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner.backends.base import EXIT_CANCELLED, EnvironmentProblem

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run

GRACE_S = 30.0
SIGNAL_LEAD_S = 120  # seconds before the time limit that the script is told to checkpoint and requeue
POLL_S = 1.0
LOST_AFTER_S = 120.0  # how long the job may be invisible to squeue/scontrol before the run counts as failed
CMD_TIMEOUT_S = 10.0


PENDING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
)
RUNNING_STATES = frozenset(
    {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED", "STOPPED", "SPECIAL_EXIT"}
)
FAILED_STATES = frozenset(
    {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"}
)
UNUSABLE_NODE_STATES = ("down", "drain", "drng", "fail", "inval", "maint", "npc", "unk", "no_respond")


def time_limit_s(limit: str | None) -> int | None:
    """Slurm's time formats (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) in seconds; None when unlimited."""
    if not limit or limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, rest = limit.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return None
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts[:3]
    return ((d * 24 + h) * 60 + m) * 60 + sec


def signal_lead_s(limit: str | None) -> int:
    """How long before the time limit the script is told to checkpoint: 120 s, less for short jobs."""
    total = time_limit_s(limit)
    return SIGNAL_LEAD_S if total is None or total >= 4 * SIGNAL_LEAD_S else max(total // 4, 5)


def map_state(slurm_state: str, exit_code: int | None, restarts: int = 0) -> tuple[str, int | None]:
    """A Slurm job state (squeue/scontrol/sacct spelling) as a run state and exit code."""
    s = slurm_state.split()[0].rstrip("+").upper() if slurm_state.strip() else "UNKNOWN"
    if s in PENDING_STATES:
        # A requeued job already ran: to the run it is still running, waiting to resume.
        return ("running" if restarts > 0 or s != "PENDING" else "pending", None)
    if s in RUNNING_STATES:
        return ("running", None)
    if s == "COMPLETED":
        return ("succeeded", 0) if not exit_code else ("failed", exit_code)
    if s == "CANCELLED":
        return ("cancelled", EXIT_CANCELLED)
    if s in FAILED_STATES:
        if exit_code == EXIT_CANCELLED:
            return ("cancelled", EXIT_CANCELLED)
        return ("failed", exit_code if exit_code else 1)
    return ("running", None)  # an unknown state: keep waiting rather than declare an end


def _exit_code(field: str) -> int | None:
    """`ExitCode=130:0` -> 130; a job killed by signal N (`0:N`) -> 128+N."""
    try:
        code, _, sig = field.partition(":")
        c, s = int(code), int(sig or 0)
    except ValueError:
        return None
    return 128 + s if c == 0 and s else c


def gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G string: `gpu:8`, `gpu:mi300x:8(S:0-1)`, `gpu:a100:4,nvme:1` -> 8, 8, 4."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        try:
            total += int(parts[-1])
        except ValueError:
            total += 1
    return total


@dataclass(frozen=True)
class SlurmNode:
    name: str
    partitions: tuple[str, ...]
    cpus: int
    memory_mb: int
    gpus: int
    state: str

    @property
    def usable(self) -> bool:
        return not self.state.lower().lstrip().startswith(UNUSABLE_NODE_STATES)


def _slurm(
    args: list[str],
    timeout: float = CMD_TIMEOUT_S,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, input=stdin)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"no Slurm client: `{args[0]}` is not on PATH; install Slurm's client commands (Debian: slurm-client) "
            "or use another backend with --backend"
        ) from None
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(
            f"the Slurm controller did not answer `{' '.join(args[:2])}` within {timeout:.0f} s; check that slurmctld "
            "runs (`scontrol ping`) or use another backend"
        ) from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def list_nodes() -> list[SlurmNode]:
    """Every node with its partitions, as the controller reports them (raises EnvironmentProblem)."""
    cp = _slurm(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%t"])
    if cp.returncode != 0:
        raise EnvironmentProblem(
            f"no Slurm controller answers (sinfo: {_first_line(cp.stderr)}); start slurmctld and slurmd "
            "(.ci/slurm-up.sh on a test machine) or use another backend"
        )
    nodes: dict[str, SlurmNode] = {}
    for line in cp.stdout.splitlines():
        f = line.split("|")
        if len(f) != 6:
            continue
        name, part, cpus, mem, gres, state = f
        old = nodes.get(name)
        parts = (old.partitions if old else ()) + (part,)
        try:
            nodes[name] = SlurmNode(name, parts, int(cpus), int(mem.rstrip("+")), gres_gpus(gres), state)
        except ValueError:
            continue
    return list(nodes.values())


def preflight(plan: Plan, nodes: list[SlurmNode]) -> None:
    """Refuse a job that this cluster could never start, instead of letting it pend forever."""
    res = plan.resources
    default = next((p.rstrip("*") for n in nodes for p in n.partitions if p.endswith("*")), None)
    partition = res.slurm.partition or default
    if partition is None:
        raise EnvironmentProblem("Slurm has no default partition; set resources.slurm.partition in the job file")
    in_part = [n for n in nodes if partition in (p.rstrip("*") for p in n.partitions)]
    if not in_part:
        known = sorted({p.rstrip("*") for n in nodes for p in n.partitions})
        raise EnvironmentProblem(
            f"Slurm has no partition {partition!r} (it has: {', '.join(known) or 'none'}); fix resources.slurm.partition"
        )
    usable = [n for n in in_part if n.usable]
    fitting = [
        n
        for n in usable
        if n.gpus >= res.gpus and (res.cpus or 0) <= n.cpus and (res.memory_gb or 0) * 1024 <= n.memory_mb
    ]
    if len(fitting) >= res.nodes:
        return
    wants = [
        f"{res.gpus} GPU(s)" if res.gpus else None,
        f"{res.cpus} CPU(s)" if res.cpus else None,
        f"{res.memory_gb} GB" if res.memory_gb else None,
    ]
    each = ", ".join(w for w in wants if w)
    biggest = max(in_part, key=lambda n: (n.gpus, n.cpus, n.memory_mb))
    raise EnvironmentProblem(
        f"the job asks for resources.nodes={res.nodes}{' with ' + each + ' each' if each else ''}, but Slurm "
        f"partition {partition!r} has {len(in_part)} node(s), {len(usable)} up, {len(fitting)} big enough "
        f"(largest: {biggest.name} with {biggest.gpus} GPU(s), {biggest.cpus} CPUs, {biggest.memory_mb // 1024} GB); "
        f"it would wait forever. Lower resources.nodes/gpus/cpus/memory_gb or pick another resources.slurm.partition"
    )


class SlurmHandle:
    def __init__(self, backend: SlurmBackend, run: Run, job_id: str, attach: bool, log_offset: int):
        self.backend = backend
        self.run = run
        self.job_id = job_id
        self.attach = attach
        self._offset = log_offset

    def _follow(self) -> None:
        if not self.attach:
            return
        try:
            with open(self.run.log_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if chunk:
            self._offset += len(chunk)
            try:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            except (BrokenPipeError, ValueError):
                self.attach = False

    def wait(self) -> int:
        last_seen = time.monotonic()
        while True:
            seen = self.backend.poll(self.run)
            self._follow()
            if seen is not None:
                last_seen = time.monotonic()
                state, code = seen
                if state in ("succeeded", "failed", "cancelled"):
                    time.sleep(0.2)  # slurmstepd has closed the output; pick up its last lines
                    self._follow()
                    return int(code if code is not None else (0 if state == "succeeded" else 1))
            elif time.monotonic() - last_seen > LOST_AFTER_S:
                msg = f"runner: Slurm job {self.job_id} vanished (not in squeue, scontrol or sacct)\n"
                with open(self.run.log_path, "a", encoding="utf-8") as f:
                    f.write(msg)
                self._follow()
                return 1
            time.sleep(POLL_S)

    def cancel(self) -> None:
        # Called from a signal handler: ask for a checkpoint now, force the end later, in the background.
        threading.Thread(target=self.backend.cancel, args=(self.run, GRACE_S), daemon=True).start()


class SlurmBackend:
    name = "slurm"

    def render_files(self, plan: Plan) -> dict[str, str]:
        from runner.templating import render_template

        res = plan.resources
        runtime = res.slurm.container
        env: list[tuple[str, str | None]] = [
            (k, None if k in plan.secret_env else v)
            for k, v in sorted(plan.env.items())
            if k not in ("RUNNER_RUN_DIR", "RUNNER_CACHE", "RUNNER_HOME")  # set per run at submission
        ]
        srun_extra, task_prefix = "", ""
        image = plan.image.tag if plan.image is not None else None
        if runtime == "pyxis" and image:
            if res.container.registry:  # the nodes pull it from there
                image = f"{res.container.registry.rstrip('/')}/{image}"
            workdir = shlex.quote(str(plan.workdir))
            srun_extra = (
                f"--container-image={shlex.quote(image)} --container-workdir={workdir} "
                f'--container-mounts={workdir},"${{RUNNER_RUN_DIR}},${{RUNNER_CACHE}}" '
            )
        elif runtime == "apptainer" and image:
            gpu = "--nv" if plan.image and plan.image.flavour == "cuda" else "--rocm"
            task_prefix = (
                f'apptainer exec {gpu} --bind {shlex.quote(str(plan.workdir))},"${{RUNNER_RUN_DIR}},${{RUNNER_CACHE}}" '
                f'"${{RUNNER_SIF:-${{RUNNER_HOME}}/images/{image.replace(":", "_")}.sif}}" '
            )
        files = {
            "sbatch.sh": render_template(
                "sbatch.sh.j2",
                name=plan.name,
                kind=plan.kind,
                nodes=res.nodes,
                gpus=res.gpus,
                processes=res.processes,
                cpus=res.cpus,
                memory_gb=res.memory_gb,
                time=res.slurm.time,
                partition=res.slurm.partition,
                account=res.slurm.account,
                image=image if runtime != "none" else None,
                workdir=plan.workdir,
                env=env,
                path_prepend=str(Path(sys.executable).parent) if runtime == "none" else None,
                signal_lead_s=signal_lead_s(res.slurm.time),
                srun_extra=srun_extra,
                task_prefix=task_prefix,
                exit_cancelled=EXIT_CANCELLED,
            )
        }
        return files

    def check(self, plan: Plan) -> None:
        for tool in ("sbatch", "squeue", "scancel", "sinfo", "scontrol"):
            if shutil.which(tool) is None:
                raise EnvironmentProblem(
                    f"no Slurm client: `{tool}` is not on PATH; install Slurm's client commands "
                    "(Debian: slurm-client) or use another backend with --backend"
                )
        preflight(plan, list_nodes())
        # The controller's own verdict on the exact script (accounts, QoS, limits), without submitting it.
        cp = _slurm(["sbatch", "--test-only"], stdin=plan.files["sbatch.sh"])
        if cp.returncode != 0:
            raise EnvironmentProblem(f"Slurm refuses the job: {_first_line(cp.stderr)} (sbatch --test-only)")

    def start(self, plan: Plan, run: Run, attach: bool = True) -> SlurmHandle:
        from runner.paths import runner_home

        script = run.plan_dir / "sbatch.sh"
        if not script.exists():
            raise EnvironmentProblem(f"{script} is missing; the run was planned for another backend")
        env = dict(os.environ)
        env.update(plan.env)
        env["RUNNER_RUN_DIR"] = str(run.dir)
        env.setdefault("RUNNER_HOME", str(runner_home()))
        env.setdefault("RUNNER_CACHE", str(Path(env["RUNNER_HOME"]) / "cache"))
        run.log_path.touch()
        offset = run.log_path.stat().st_size
        cp = _slurm(
            [
                "sbatch",
                "--parsable",
                f"--output={run.log_path}",
                "--open-mode=append",
                f"--chdir={plan.workdir}",
                "--export=ALL",
                str(script),
            ],
            env=env,
        )
        if cp.returncode != 0:
            raise EnvironmentProblem(f"sbatch refused the job: {_first_line(cp.stderr)}")
        job_id = cp.stdout.strip().split(";")[0]
        run.update(backend_ref={"slurm_job_id": job_id, "cluster": _cluster_name()})
        run.note("submitted", slurm_job_id=job_id)
        return SlurmHandle(self, run, job_id, attach, offset)

    def poll(self, run: Run) -> tuple[str, int | None] | None:
        job_id = _job_id(run)
        if job_id is None:
            return None
        try:
            info = job_info(job_id)
        except SlurmUnavailable:
            return None  # unknown for now; never fall back to an exit file a requeued attempt left behind
        if info is not None:
            return map_state(
                info.get("JobState", ""),
                _exit_code(info.get("ExitCode", "")),
                int(info.get("Restarts", "0") or 0),
            )
        exit_file = run.dir / f"slurm-{job_id}.exit"
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or 1)
            return (
                ("succeeded", 0)
                if code == 0
                else (("cancelled", code) if code == EXIT_CANCELLED else ("failed", code))
            )
        cp = _slurm(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"])
        if cp.returncode == 0 and cp.stdout.strip():
            state, _, exit_field = cp.stdout.strip().splitlines()[0].partition("|")
            return map_state(state, _exit_code(exit_field))
        return None

    def cancel(self, run: Run, grace_s: float = GRACE_S) -> None:
        job_id = _job_id(run)
        if job_id is None:
            return
        try:
            info = job_info(job_id)
        except SlurmUnavailable as e:
            raise EnvironmentProblem(f"the Slurm controller does not answer about job {job_id} ({e}); try again") from None
        state = map_state(info.get("JobState", ""), None)[0] if info else None
        if state == "running" and grace_s > 0:
            # The script traps USR2 and forwards SIGTERM to the workload, which checkpoints and exits 130.
            _slurm(["scancel", "--batch", "--signal=USR2", job_id])
            end = time.monotonic() + grace_s
            while time.monotonic() < end:
                time.sleep(0.5)
                try:
                    info = job_info(job_id)
                except SlurmUnavailable:
                    continue
                if info is None or map_state(info.get("JobState", ""), None)[0] != "running":
                    return
        if state in ("pending", "running"):
            cp = _slurm(["scancel", job_id])
            if cp.returncode != 0 and "already completing" not in cp.stderr:
                raise EnvironmentProblem(f"scancel {job_id} failed: {_first_line(cp.stderr)}")


def _job_id(run: Run) -> str | None:
    ref = run.status().get("backend_ref") or {}
    jid = ref.get("slurm_job_id")
    return str(jid) if jid else None


def _cluster_name() -> str | None:
    cp = _slurm(["scontrol", "show", "config"])
    for line in cp.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


class SlurmUnavailable(Exception):
    """scontrol gave no answer about a job (as opposed to: the job is not known)."""


def job_info(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict; None once the controller has forgotten the job (MinJobAge)."""
    cp = _slurm(["scontrol", "show", "job", "-o", job_id])
    if cp.returncode != 0 and "invalid job id" not in (cp.stderr or "").lower():
        # The controller did not answer (busy, restarting): that says nothing about the job.
        raise SlurmUnavailable(_first_line(cp.stderr or cp.stdout or f"scontrol exited {cp.returncode}"))
    if cp.returncode != 0 or not cp.stdout.strip():
        return None
    out: dict[str, str] = {}
    for word in cp.stdout.split():
        key, sep, value = word.partition("=")
        if sep and key not in out:
            out[key] = value
    return out
