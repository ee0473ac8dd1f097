"""Backends: where a plan runs. Modules are imported on first use so the CLI starts fast."""

from __future__ import annotations

import importlib

from runner.backends.base import EXIT_CANCELLED, Backend, EnvironmentProblem, Handle

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


__all__ = ["BACKENDS", "EXIT_CANCELLED", "Backend", "EnvironmentProblem", "Handle", "get_backend"]
