"""The run-store commands: `runner ls` (with filters), `runner rm`, `runner gc` and `runner track` (MLflow)."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


def _exit(code: int, message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add these commands to the `runner` app."""

    @app.command("ls")
    def ls_(
        job: str | None = typer.Argument(None, help="Only runs of this job."),
        kind: list[str] = typer.Option([], "--kind", help="Only this kind: train, eval, serve, ... (repeatable)."),
        state: list[str] = typer.Option([], "--state", help="Only this state: running, succeeded, ... (repeatable)."),
        tag: list[str] = typer.Option([], "--tag", help="Only runs whose job has tag KEY=VALUE (repeatable: all)."),
    ) -> None:
        """List runs: id, job, kind, state, backend, started, steps, final and best validation accuracy."""
        from rich.console import Console
        from rich.table import Table

        from runner.housekeeping import matches, parse_tags
        from runner.run_views import ls_rows
        from runner.runs import REF_PART_RE, RunStore

        try:
            tags = parse_tags(tag)
        except ValueError as e:
            _exit(2, f"error: {e}")
        if job is not None and not REF_PART_RE.fullmatch(job):
            _exit(2, f"error: {job!r} is not a job name (letters, digits, '.', '_', '-')")
        t = Table(box=None, header_style="bold")
        for col in ("run", "job", "kind", "state", "backend", "started", "steps", "val acc", "best"):
            t.add_column(col, no_wrap=True)
        runs = [r for r in RunStore().list(job) if matches(r, kind, tags)]
        rows, unreadable = ls_rows(runs)
        for row in rows:
            if not state or any(row[3] == s or row[3].startswith(s + " ") for s in state):
                t.add_row(*row)
        # Piped output (scripts, tests) is never truncated to a terminal width.
        Console(width=None if sys.stdout.isatty() else 250).print(t)
        for problem in unreadable:
            print(f"warning: {problem}", file=sys.stderr)

    @app.command()
    def rm(
        refs: list[str] = typer.Argument(..., help="Runs to delete (id, job/id, or a job name: its latest run)."),
        force: bool = typer.Option(False, "--force", help="Also delete a promoted or best run (never a live one)."),
    ) -> None:
        """Delete runs; refuses a running run, and a promoted one unless --force."""
        from runner.housekeeping import rm_main

        raise typer.Exit(rm_main(refs, force))

    @app.command()
    def gc(
        job: str | None = typer.Argument(None, help="Only runs of this job."),
        yes: bool = typer.Option(False, "--yes", help="Delete (without it, only list what would go)."),
    ) -> None:
        """Remove runs that are not promoted, not the best of their job, and not running. A dry run unless --yes."""
        from runner.housekeeping import gc_main

        raise typer.Exit(gc_main(job, yes))

    @app.command()
    def track(ref: str = typer.Argument(..., help="Run to send to MLflow.")) -> None:
        """Send a run's params, metrics and artifacts to MLflow (what a tracking server that was down missed)."""
        from runner.tracking import track_main

        raise typer.Exit(track_main(ref))
