"""Data paths a job names, checked when the job is validated: a missing file fails `runner validate`, not the run.

Paths are relative to the directory `runner` runs in (the workload's working directory). Paths that exist only
where the job runs (a cluster's shared storage, inside an image) are marked `remote: true` and not looked for;
neither are `builtin:` sources, paths with `$VARIABLES` (expanded where the job runs) or any path of a Kubernetes
job (its data lives on the cluster's volume). Hub data sets (`hf:`) have no path to look for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runner.spec.models import DataSource


def _sources(node: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], DataSource]]:
    if isinstance(node, DataSource):
        yield loc, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _sources(getattr(node, name), (*loc, name))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _sources(item, (*loc, i))


def missing_data_paths(spec: BaseModel) -> list[tuple[tuple[str | int, ...], str]]:
    """(location of the `path` field, message) for each local data path that does not exist."""
    if getattr(spec, "backend", None) == "kubernetes":
        return []
    out = []
    for loc, src in _sources(spec, ()):
        if src.path is None or src.remote or src.path.startswith("builtin:") or "$" in src.path:  # None: `hf:`
            continue
        try:
            p = Path(src.path).expanduser()
            exists = p.exists()
        except (OSError, RuntimeError) as e:  # a name too long for the file system; ~user with no such user
            out.append(((*loc, "path"), f"cannot be looked up: {e.strerror if isinstance(e, OSError) else e}"))
            continue
        if not exists:
            out.append(((*loc, "path"), f"no such file or directory: {p.absolute()} (relative paths start at the "
                                        f"directory runner runs in, {Path.cwd()}); if it exists only where the job "
                                        "runs, add `remote: true` to this source"))
        elif not (p.is_file() or p.is_dir()):
            out.append(((*loc, "path"), f"{p} is not a regular file or a directory"))
    return out
