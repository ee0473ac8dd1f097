"""Durable file writes: atomic replace, fsync of files, directories and trees, content hashes."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, deepest first, then `path` itself."""
    for p in sorted(path.rglob("*"), reverse=True):
        fsync_dir(p)  # os.open(O_RDONLY) + fsync works for files and directories alike
    fsync_dir(path)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old content or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
