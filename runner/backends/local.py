"""Local backend: the plan's command as a child process in its own process group on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from runner.backends.base import EXIT_CANCELLED, EnvironmentProblem, OutputPump

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run

GRACE_S = 30.0


def local_argv(plan: Plan, run_dir: Path) -> list[str]:
    """The plan's argv with this interpreter and the run directory filled in."""
    out = []
    bindir = Path(sys.executable).parent
    for i, a in enumerate(plan.argv):
        a = a.replace("${RUNNER_RUN_DIR}", str(run_dir))
        if i == 0 and a == "python":
            a = sys.executable
        elif i == 0 and a == "accelerate":
            a = str(bindir / "accelerate") if (bindir / "accelerate").exists() else "accelerate"
        out.append(a)
    return out


def local_env(plan: Plan, run: Run) -> dict[str, str]:
    from runner.paths import runner_home

    env = dict(os.environ)
    env.update(plan.env)
    env["RUNNER_RUN_DIR"] = str(run.dir)
    env.setdefault("RUNNER_HOME", str(runner_home()))
    env.setdefault("RUNNER_CACHE", str(Path(env["RUNNER_HOME"]) / "cache"))
    return env


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes], run: Run, attach: bool, log: IO[bytes]):
        self.proc = proc
        self.run = run
        self.attach = attach
        assert proc.stdout is not None
        stdout = proc.stdout
        self._pump = OutputPump(lambda: iter(lambda: stdout.read1(65536), b""), log, attach, "process")  # type: ignore[attr-defined]

    def wait(self) -> int:
        code = self.proc.wait()
        self._pump.close(timeout=10)
        # A child killed by a signal reports -N; shells report 128+N. Both mean the job did not finish.
        if code < 0:
            code = EXIT_CANCELLED if -code in (signal.SIGTERM, signal.SIGINT) else 128 - code
        return code

    def cancel(self) -> None:
        terminate_group(self.proc.pid, GRACE_S)


def terminate_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group, give it `grace_s` to checkpoint and exit, then SIGKILL it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def reaper() -> None:
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=reaper, daemon=True).start()


class LocalBackend:
    name = "local"

    def render_files(self, plan: Plan) -> dict[str, str]:
        return {}

    def check(self, plan: Plan) -> None:
        if plan.resources.gpus > 0:
            probe = ["/dev/kfd"] if plan.image is None or plan.image.flavour != "cuda" else ["/dev/nvidia0"]
            flavour = plan.job.spec.image  # type: ignore[attr-defined]
            if flavour == "cuda":
                probe = ["/dev/nvidia0", "/dev/nvidiactl"]
            elif flavour == "rocm":
                probe = ["/dev/kfd"]
            else:
                probe = ["/dev/kfd", "/dev/nvidia0"]
            if not any(Path(p).exists() for p in probe):
                raise EnvironmentProblem(
                    f"the job asks for resources.gpus={plan.resources.gpus} but no GPU device "
                    f"({' or '.join(probe)}) exists on this machine; set resources.gpus: 0 to run on CPU"
                )

    def start(self, plan: Plan, run: Run, attach: bool = True) -> LocalHandle:
        argv = local_argv(plan, run.dir)
        log = open(run.log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv, cwd=plan.workdir, env=local_env(plan, run), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as e:
            log.close()
            raise EnvironmentProblem(f"cannot start {argv[0]}: {e}") from None
        run.update(backend_ref={"pid": proc.pid, "pgid": proc.pid, "host": os.uname().nodename})
        return LocalHandle(proc, run, attach, log)

    def poll(self, run: Run) -> tuple[str, int | None] | None:
        from runner.runs import pid_alive

        ref = run.status().get("backend_ref") or {}
        if ref.get("host") not in (None, os.uname().nodename):
            return None
        if pid_alive(ref.get("pid")):
            return ("running", None)
        return None

    def cancel(self, run: Run, grace_s: float = GRACE_S) -> None:
        ref = run.status().get("backend_ref") or {}
        pgid = ref.get("pgid")
        if pgid:
            terminate_group(int(pgid), grace_s)
            end = time.monotonic() + grace_s + 5
            from runner.runs import pid_alive

            while pid_alive(ref.get("pid")) and time.monotonic() < end:
                time.sleep(0.2)
