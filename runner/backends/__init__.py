"""Backends: where a plan runs. Modules are imported on first use so the CLI starts fast."""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import TYPE_CHECKING

from runner.backends.base import EXIT_CANCELLED, Backend, EnvironmentProblem, Handle

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run
    from runner.spec import Job

BACKENDS = {
    "local": "runner.backends.local:LocalBackend",
    "docker": "runner.backends.docker:DockerBackend",
    "slurm": "runner.backends.slurm:SlurmBackend",
    "kubernetes": "runner.backends.kubernetes:KubernetesBackend",
}


def get_backend(name: str) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise EnvironmentProblem(f"unknown backend {name!r}; one of: {', '.join(BACKENDS)}")
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise EnvironmentProblem(f"the {name} backend is not available in this installation") from None
        raise
    backend: Backend = getattr(mod, cls)()
    return backend


def poll_run(run: Run) -> tuple[str, int | None] | None:
    """(state, exit code) of a run as the backend it ran on sees it now; None when it cannot tell or be asked."""
    try:
        return get_backend(str(run.status().get("backend") or "local")).poll(run)
    except EnvironmentProblem:
        return None


def plan_for(job: Job, backend: str | None = None, workdir: str | None = None) -> Plan:
    """The job's plan with the backend's own files added: what `runner plan` shows and `runner run` writes."""
    from runner.plan import render_plan

    plan = render_plan(job, backend, workdir)
    return replace(plan, files={**plan.files, **get_backend(plan.backend).render_files(plan)})


__all__ = ["BACKENDS", "EXIT_CANCELLED", "Backend", "EnvironmentProblem", "Handle", "get_backend", "plan_for", "poll_run"]
