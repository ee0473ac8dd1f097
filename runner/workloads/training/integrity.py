"""Checkpoint integrity: a manifest of every file's size and sha256, written just before trainer_state.json, and
a reader that checks a checkpoint against it and loads the whole checkpoint into memory before a resume uses any
of it, so a damaged file is named (and the checkpoint passed over) before the run's state is touched."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from runner.files import sha256_file
from runner.workloads.training.checkpoints import STATE, STEP_DIR

MANIFEST = "manifest.json"
ADAPTER = "adapter/adapter_model.safetensors"


class CheckpointError(Exception):
    """A checkpoint that is intact but cannot be used by this run (other resources, another model)."""


class CheckpointDamaged(Exception):
    """A checkpoint file that cannot be trusted: which one, and why."""

    def __init__(self, ckpt: Path, file: str, why: str):
        super().__init__(f"{ckpt / file}: {why}")
        self.ckpt, self.file, self.why = ckpt, file, why


@dataclass
class Loaded:
    """Everything a resume needs from one checkpoint, already read and checked."""

    path: Path
    step: int
    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    rng: Any
    has_manifest: bool


def write_manifest(ckpt: Path) -> None:
    """Record the size and sha256 of every file in `ckpt` (all but the manifest and trainer_state.json)."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and rel not in (MANIFEST, STATE):
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    (ckpt / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def _read_json(ckpt: Path, rel: str) -> Any:
    try:
        return json.loads((ckpt / rel).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(ckpt, rel, "missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointDamaged(ckpt, rel, f"unreadable JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise CheckpointDamaged(ckpt, rel, "unreadable JSON (not UTF-8 text)") from None
    except OSError as e:
        raise CheckpointDamaged(ckpt, rel, f"unreadable ({e.strerror})") from None


def verify(ckpt: Path) -> tuple[dict[str, Any], bool]:
    """(trainer state, whether a manifest was checked) of `ckpt`; raises CheckpointDamaged naming the first bad
    file. A checkpoint written before manifests existed has nothing to check its files against."""
    state = _read_json(ckpt, STATE)
    m = STEP_DIR.match(ckpt.name)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
            state.get("composer"), dict):
        raise CheckpointDamaged(ckpt, STATE, "not a trainer state (no step or composer)")
    if m and state["step"] != int(m.group(1)):
        raise CheckpointDamaged(ckpt, STATE, f"says step {state['step']}, the directory is step {int(m.group(1))}")
    if not (ckpt / MANIFEST).exists():
        return state, False
    manifest = _read_json(ckpt, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise CheckpointDamaged(ckpt, MANIFEST, "not a checkpoint manifest (no files table)")
    for rel, want in files.items():
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise CheckpointDamaged(ckpt, MANIFEST, f"lists {rel!r}, which is outside the checkpoint")
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointDamaged(ckpt, rel, f"missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != want.get("size"):
            raise CheckpointDamaged(
                ckpt, rel, f"size {size} bytes, {MANIFEST} says {want.get('size')} (truncated or overwritten)")
        if sha256_file(p) != want.get("sha256"):
            raise CheckpointDamaged(ckpt, rel, f"sha256 differs from {MANIFEST} (contents changed since written)")
    return state, True


def _read(ckpt: Path, rel: str, load: Callable[[Path], Any]) -> Any:
    p = ckpt / rel
    if not p.is_file():
        raise CheckpointDamaged(ckpt, rel, "missing")
    try:
        return load(p)
    except Exception as e:  # the deserializers raise anything from EOFError to their own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointDamaged(ckpt, rel, f"unreadable ({type(e).__name__}{': ' + first if first else ''})") from None


def load_checkpoint(ckpt: Path, world: int, rank_suffix: str) -> Loaded:
    """Verify `ckpt` and read all of it; CheckpointDamaged names a bad file, CheckpointError an unusable one."""
    from safetensors.torch import load_file

    state, has_manifest = verify(ckpt)
    written_by = int(state.get("world_size", 1))
    if written_by != world:
        raise CheckpointError(
            f"checkpoint {ckpt.name} was written by {written_by} process(es), this run has {world}; "
            f"resume with the same resources ({written_by} ranks: resources.gpus, or resources.processes on CPU, "
            "times resources.nodes), or start anew with `runner run --fresh`"
        )

    def pickled(p: Path) -> Any:
        return torch.load(p, weights_only=False)

    return Loaded(
        path=ckpt,
        step=state["step"],
        state=state,
        adapter=_read(ckpt, ADAPTER, lambda p: load_file(str(p))),
        optimizer=_read(ckpt, f"optimizer{rank_suffix}.pt", pickled),
        scheduler=_read(ckpt, "scheduler.pt", pickled),
        rng=_read(ckpt, f"rng{rank_suffix}.pt", pickled),
        has_manifest=has_manifest,
    )


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged `step-N` to `damaged-step-N`: never resumed from or retained, kept for inspection. A `best`
    link that pointed at it is removed rather than left dangling."""
    dest = ckpt.with_name(f"damaged-{ckpt.name}")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    best = ckpt.parent / "best"
    if best.is_symlink() and best.resolve() == ckpt.resolve():
        best.unlink()
    ckpt.rename(dest)
    return dest
