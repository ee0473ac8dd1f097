"""Housekeeping of the run store: which runs a registry version came from, which run of a job is its best,
`runner rm` (refuses running and promoted runs unless forced) and `runner gc` (a dry run unless --yes)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runs import Run, RunStore


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def promoted_from(home: Path | None = None) -> dict[str, list[str]]:
    """Run directory -> the registry versions promoted from it (e.g. ["qa-agent:v2"])."""
    from runner.registry.store import Registry, RegistryError

    reg = Registry(home)
    out: dict[str, list[str]] = {}
    for name in reg.names():
        for v in reg.versions(name):
            try:
                src = reg.manifest(name, v).get("source") or {}
            except RegistryError:
                continue
            if src.get("run_dir"):
                out.setdefault(str(Path(str(src["run_dir"])).resolve()), []).append(f"{name}:v{v}")
    return out


def best_val(r: Run) -> float | None:
    accs = [float(m["accuracy"]) for m in r.metrics() if m.get("split") == "val"
            and isinstance(m.get("accuracy"), (int, float)) and m.get("step", 0) != 0]
    return max(accs) if accs else None


def _inside(store: RunStore, r: Run) -> bool:
    """The run's directory really is a run directory of this store (no link or `..` leads elsewhere)."""
    runs = store.runs_dir.resolve()
    d = r.dir.resolve()
    return d.parent.parent == runs and not r.dir.is_symlink() and not r.dir.parent.is_symlink()


@dataclass
class Verdict:
    run: Run
    keep: bool
    why: str


def why_kept(r: Run, promoted: dict[str, list[str]], best: set[str]) -> str | None:
    """Why `runner rm` / `runner gc` must not delete this run without --force, or None."""
    st = r.status()
    state = str(st.get("state", ""))
    if r.is_locked() or r.workload_holder() is not None or state in ("running", "pending"):
        return f"it is {state or 'running'}; `runner cancel {r.id}` stops it first"
    versions = promoted.get(str(r.dir.resolve()))
    if versions:
        return f"registry version(s) {', '.join(versions)} were promoted from it (their lineage points here)"
    if str(r.dir) in best:
        return "it is the best run of its job by validation accuracy"
    return None


def best_runs(runs: list[Run]) -> set[str]:
    by_job: dict[str, tuple[float, str]] = {}
    for r in runs:
        acc = best_val(r)
        if acc is not None and (r.job_name not in by_job or acc > by_job[r.job_name][0]):
            by_job[r.job_name] = (acc, str(r.dir))
    return {d for _, d in by_job.values()}


def rm_main(refs: list[str], force: bool) -> int:
    from runner.runs import RunError, RunStore

    store = RunStore()
    try:
        runs = [store.get(ref) for ref in refs]
    except RunError as e:
        _err(f"error: {e}")
        return 2
    promoted = promoted_from()
    code = 0
    for r in runs:
        if not _inside(store, r):
            _err(f"error: {r.dir} is not a run directory under {store.runs_dir}; nothing removed")
            code = 2
            continue
        why = why_kept(r, promoted, set())
        alive = r.is_locked() or r.workload_holder() is not None
        if why and (not force or alive):  # a live run is never removed: its workload would write into nothing
            hint = "" if alive else "; --force removes it anyway"
            _err(f"refused: {r.ref} not removed: {why}{hint}")
            code = 1
            continue
        shutil.rmtree(r.dir)
        print(f"removed {r.ref} ({r.dir})" + (f" [forced: {why}]" if why else ""))
    return code


def gc_plan(store: RunStore, job: str | None) -> list[Verdict]:
    runs = store.list(job)
    promoted = promoted_from()
    best = best_runs(runs)
    out = []
    for r in runs:
        try:
            why = why_kept(r, promoted, best)
        except Exception as e:  # an unreadable run is kept and named: gc deletes only what it understands
            why = f"unreadable ({e})"
        out.append(Verdict(r, why is not None, why or "not promoted, not the best of its job, not running"))
    return out


def gc_main(job: str | None, yes: bool) -> int:
    from runner.runs import REF_PART_RE, RunStore

    if job is not None and not REF_PART_RE.fullmatch(job):
        _err(f"error: {job!r} is not a job name (letters, digits, '.', '_', '-')")
        return 2
    store = RunStore()
    verdicts = gc_plan(store, job)
    for v in verdicts:
        print(f"{'keep  ' if v.keep else ('remove' if yes else 'would remove')} {v.run.ref}: {v.why}")
    doomed = [v.run for v in verdicts if not v.keep and _inside(store, v.run)]
    if not yes:
        print(f"dry run: {len(doomed)} of {len(verdicts)} run(s) would be removed; `runner gc --yes` removes them")
        return 0
    for r in doomed:
        shutil.rmtree(r.dir)
    print(f"removed {len(doomed)} of {len(verdicts)} run(s)")
    return 0


def matches(r: Run, kinds: list[str], tags: list[tuple[str, str]]) -> bool:
    """`runner ls --kind/--tag` (repeatable: any of the kinds, all of the tags). A run whose status cannot be
    read matches no kind filter; without one it is kept, for `ls` to name it as unreadable."""
    from runner.runs import RunError

    if kinds:
        try:
            st: dict[str, Any] = r.status()
        except RunError:
            return False
        if str(st.get("kind", "")) not in kinds:
            return False
    if tags:
        try:
            have = r.job_data().get("tags") or {}
        except Exception:  # a damaged job.yaml: the run has no tags to match (ls still lists it unfiltered)
            return False
        if not all(str(have.get(k)) == v for k, v in tags):
            return False
    return True


def parse_tags(raw: list[str]) -> list[tuple[str, str]]:
    out = []
    for t in raw:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise ValueError(f"--tag {t!r}: write KEY=VALUE, e.g. --tag team=blue")
        out.append((k, v))
    return out
