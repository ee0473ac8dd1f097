"""Data sets from a job's sources: selection, deduplication, the stratified train/val split, subsampling."""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from runner.files import sha256_file
from runner.spec.models import DataSource, DataSpec
from runner.workloads.data.importers import import_source
from runner.workloads.data.records import MCQ, DataError


def _select(records: list[MCQ], src: DataSource, seed: int) -> list[MCQ]:
    if src.topics is not None:
        known = {r.topic for r in records}
        missing = [t for t in src.topics if t not in known]
        if missing:
            raise DataError(
                f"data source {src.label!r}: topics {missing} not found; available: {', '.join(sorted(known))}"
            )
        wanted = set(src.topics)
        records = [r for r in records if r.topic in wanted]
    if src.limit is not None and len(records) > src.limit:
        rng = random.Random(f"limit:{seed}:{src.label}")
        idx = sorted(rng.sample(range(len(records)), src.limit))
        records = [records[i] for i in idx]
    return records


def load_sources(
    sources: Sequence[DataSource], *, seed: int = 0, max_bad_rows: int = 0, base_dir: Path | None = None
) -> list[MCQ]:
    """Import, filter (`topics`, `limit`) and concatenate sources: the one entry point every workload uses.

    Raises DataError listing every bad row when a source has more than `max_bad_rows`; otherwise the bad rows
    are printed to stderr as warnings and skipped.
    """
    records, _ = load_sources_with_report(sources, seed=seed, max_bad_rows=max_bad_rows, base_dir=base_dir)
    return records


def load_sources_with_report(
    sources: Sequence[DataSource], *, seed: int = 0, max_bad_rows: int = 0, base_dir: Path | None = None
) -> tuple[list[MCQ], list[dict[str, Any]]]:
    """Like load_sources, also returning per-source facts for manifests (files with sha256, counts, problems)."""
    out: list[MCQ] = []
    report: list[dict[str, Any]] = []
    for src in sources:
        res = import_source(src, base_dir)
        if len(res.problems) > max_bad_rows:
            raise DataError(
                f"data source {src.label!r}: {len(res.problems)} bad row(s) (data.max_bad_rows is {max_bad_rows}); "
                "fix them or raise data.max_bad_rows to skip them",
                res.problems,
            )
        for p in res.problems:
            print(f"warning: skipped bad row {p}", file=sys.stderr)
        selected = _select(res.records, src, seed)
        out.extend(selected)
        report.append(
            {
                "path": src.label,
                **res.details,
                "files": [{"path": str(f), "sha256": sha256_file(f)} for f in res.files],
                "imported": len(res.records),
                "selected": len(selected),
                "bad_rows": res.problems,
            }
        )
    return out, report


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def dedupe_key(r: MCQ) -> str:
    """Normalised question + choices (case and whitespace folded); the answer is not part of identity."""
    return "\x1f".join([_norm(r.question), *(_norm(c) for c in r.choices)])


def dedupe_report(records: Iterable[MCQ], exclude: Iterable[MCQ] = ()) -> tuple[list[MCQ], list[str]]:
    """Keep the first of each normalised question, also dropping any that appear in `exclude` (e.g. validation);
    each dropped record is listed as "FILE:LINE duplicate of FILE:LINE" (the record kept, or the excluded one)."""
    firsts: dict[str, MCQ] = {}
    for r in exclude:
        firsts.setdefault(dedupe_key(r), r)
    out: list[MCQ] = []
    dropped: list[str] = []
    for r in records:
        k = dedupe_key(r)
        first = firsts.get(k)
        if first is not None:
            dropped.append(f"{r.origin or r.id} duplicate of {first.origin or first.id}")
            continue
        firsts[k] = r
        out.append(r)
    return out, dropped


def dedupe(records: Iterable[MCQ], exclude: Iterable[MCQ] = ()) -> tuple[list[MCQ], int]:
    """dedupe_report with only the number of records dropped."""
    out, dropped = dedupe_report(records, exclude)
    return out, len(dropped)


def split_records(records: Sequence[MCQ], val_fraction: float, seed: int) -> tuple[list[MCQ], list[MCQ]]:
    """Deterministic split stratified by topic: each topic gives round(n * val_fraction) records to val.

    Records are ranked by a seeded hash of their content, so the split does not depend on input order and a
    record stays on its side when others are added.
    """
    keys = [dedupe_key(r) for r in records]  # computed once: normalising text is most of the cost
    by_topic: dict[str, list[str]] = {}
    for r, k in zip(records, keys, strict=True):
        by_topic.setdefault(r.topic, []).append(k)
    val_keys: set[str] = set()
    for topic in sorted(by_topic):
        group = sorted(by_topic[topic], key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).digest())
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(group) >= 2:
            n_val = 1
        val_keys.update(group[:n_val])
    in_val = [k in val_keys for k in keys]
    train = [r for r, v in zip(records, in_val, strict=True) if not v]
    val = [r for r, v in zip(records, in_val, strict=True) if v]
    return train, val


def subsample(records: Sequence[MCQ], limit: int | None, seed: int) -> list[MCQ]:
    """A fixed, seeded subset of at most `limit` records (input order kept)."""
    if limit is None or len(records) <= limit:
        return list(records)
    idx = sorted(random.Random(f"subsample:{seed}").sample(range(len(records)), limit))
    return [records[i] for i in idx]


def train_val_records(data: DataSpec, base_dir: Path | None = None) -> tuple[list[MCQ], list[MCQ], dict[str, Any]]:
    """The train and validation records of a job: load, dedupe, split (or load val), drop leaks into val."""
    max_bad = data.max_bad_rows
    train_all, train_report = load_sources_with_report(data.train, seed=data.seed, max_bad_rows=max_bad, base_dir=base_dir)
    if not train_all:
        raise DataError("data.train: the sources hold no records")
    train_all, dupes = dedupe_report(train_all)
    val_report: list[dict[str, Any]] = []
    if data.val:
        val, val_report = load_sources_with_report(data.val, seed=data.seed, max_bad_rows=max_bad, base_dir=base_dir)
        val, val_dupes = dedupe_report(val)
        train, leaked = dedupe_report(train_all, exclude=val)
    else:
        train, val = split_records(train_all, data.val_fraction, data.seed)
        val_dupes = leaked = []
    val = subsample(val, data.val_limit, data.seed)
    info = {
        "train_sources": train_report,
        "val_sources": val_report,
        "duplicates_removed": len(dupes) + len(val_dupes),
        "train_removed_as_in_val": len(leaked),
        "duplicates": dupes + val_dupes + leaked,  # "FILE:LINE duplicate of FILE:LINE", one per record dropped
    }
    return train, val, info
