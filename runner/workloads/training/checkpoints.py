"""Checkpoints on disk: discovery, retention, the `best` pointer, and the RNG state saved for an exact resume."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.stats import finite

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE = "trainer_state.json"  # written last: a step directory without it is a torn write


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first. Temp directories (torn writes) never count."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and (p / STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_better(acc: Any, best: Any) -> bool:
    """Whether validation accuracy `acc` beats `best`; a missing or non-finite accuracy never does."""
    return finite(acc) is not None and (finite(best) is None or acc > best)


def point_best(ckpt_dir: Path, best_step: int | None) -> None:
    """Move the `best` symlink to `step-<best_step>` atomically (a new link under a temp name, then rename).

    A checkpoint whose own validation accuracy is not a finite number is never pointed at."""
    if best_step is None:
        return
    target = f"step-{best_step:08d}"
    try:
        acc = json.loads((ckpt_dir / target / STATE).read_text()).get("val_accuracy")
    except (OSError, ValueError, AttributeError):
        return
    if finite(acc) is None:
        return
    tmp = ckpt_dir / f".best-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, ckpt_dir / "best")


def retain(ckpt_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the last `keep_last` checkpoints and the best one; drop other processes' torn writes."""
    ckpts = complete_checkpoints(ckpt_dir)
    keep = {s for s, _ in ckpts[-keep_last:]}
    if best_step is not None:
        keep.add(best_step)
    for s, p in ckpts:
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(".tmp-step-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
