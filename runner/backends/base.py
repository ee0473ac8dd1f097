"""The one small protocol every backend implements: render, check, start, poll, cancel."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run

# Exit code of a workload that stopped on SIGTERM/SIGINT after writing its checkpoint.
EXIT_CANCELLED = 130


def tee_output(chunks: Iterable[bytes], log: IO[bytes], attach: bool) -> None:
    """Copy a job's output into run.log and, when attached, to the terminal (which may go away: keep logging)."""
    out = sys.stdout.buffer if attach else None
    for chunk in chunks:
        log.write(chunk)
        log.flush()
        if out is not None:
            try:
                out.write(chunk)
                out.flush()
            except (BrokenPipeError, ValueError):
                out = None


class OutputPump:
    """A daemon thread that tees a job's output into run.log (and the terminal when attached) until it ends."""

    def __init__(self, chunks: Callable[[], Iterable[bytes]], log: IO[bytes], attach: bool, source: str):
        self._chunks = chunks
        self._log = log
        self._attach = attach
        self._source = source
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            tee_output(self._chunks(), self._log, self._attach)
        except Exception as e:  # the stream went away mid-way: the exit code still comes from the engine
            self._log.write(f"\nrunner: log stream from the {self._source} ended: {e}\n".encode())

    def close(self, timeout: float) -> None:
        """Wait (at most `timeout`) for the output to drain, then close run.log."""
        self._thread.join(timeout=timeout)
        self._log.close()


class EnvironmentProblem(Exception):
    """This machine cannot run the plan (no engine, no device, does not fit). The CLI exits 3 with the message."""


class Handle(Protocol):
    def wait(self) -> int:
        """Stream output to run.log (and the terminal when attached); return the job's exit code."""
        ...

    def cancel(self) -> None:
        """Graceful stop: SIGTERM, a grace period for a checkpoint, then kill."""
        ...


class Backend(Protocol):
    name: str

    def render_files(self, plan: Plan) -> dict[str, str]:
        """Backend-specific files for plan/ (pure): docker-run.sh, sbatch.sh, kubernetes.yaml, ..."""
        ...

    def check(self, plan: Plan) -> None:
        """Raise EnvironmentProblem within seconds when the plan cannot run here."""
        ...

    def start(self, plan: Plan, run: Run, attach: bool = True) -> Handle: ...

    def poll(self, run: Run) -> tuple[str, int | None] | None:
        """(state, exit code) as the engine sees it, or None when it cannot tell."""
        ...

    def cancel(self, run: Run, grace_s: float = 30.0) -> None:
        """Cancel from any process, using run.status()['backend_ref']."""
        ...
