"""The keys of `resources` as they moved: the flat layout of before its backend sections (still loaded, and what
spec hashes are computed over), and the rank fields that leave earlier runs' hashes alone at their defaults."""

from __future__ import annotations

from typing import Any

# The flat keys `resources` had before its backend sections, and the section and key each moved to. Job files
# and stored runs that use them still load (the loader warns about them in job files).
MOVED_RESOURCES: dict[str, tuple[str, str]] = {
    "partition": ("slurm", "partition"),
    "account": ("slurm", "account"),
    "time": ("slurm", "time"),
    "slurm_container": ("slurm", "container"),
    "namespace": ("kubernetes", "namespace"),
    "storage_class": ("kubernetes", "storage_class"),
    "storage_gb": ("kubernetes", "storage_gb"),
    "volume_claim": ("kubernetes", "volume_claim"),
    "shm_gb": ("container", "shm_gb"),
    "registry": ("container", "registry"),
}


def move_flat_resources(res: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`res` with its flat keys from MOVED_RESOURCES moved into their sections, and the keys it moved.

    A key that is also given in its section, or whose section is not a mapping, stays where it is for the
    model to report."""
    out = dict(res)
    moved = []
    for old, (section, key) in MOVED_RESOURCES.items():
        if old not in out:
            continue
        sec = out.get(section, {})
        if not isinstance(sec, dict) or key in sec:
            continue
        out[section] = {**sec, key: out.pop(old)}
        moved.append(old)
    return out, moved


# Rank fields added later: at their defaults they leave the spec hash of earlier runs as it was.
RANK_DEFAULTS: dict[str, object] = {"processes": 1, "strategy": "auto", "collective_timeout_s": 600}


def flat_resources(res: dict[str, Any]) -> dict[str, Any]:
    """`res` (a dumped Resources) in the flat layout of before the sections: what spec hashes are computed over."""
    out = {k: v for k, v in res.items() if not (k in RANK_DEFAULTS and v == RANK_DEFAULTS[k])}
    for old, (section, key) in MOVED_RESOURCES.items():
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec:
            sec = out[section] = {k: v for k, v in sec.items() if k != key}
            out[old] = res[section][key]
            if not sec:
                del out[section]
    return out
