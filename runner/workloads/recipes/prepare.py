"""Recipe for the `prepare` job kind: import, deduplicate and split MCQ data into train/val JSONL with a manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from runner.files import atomic_write, sha256_file
from runner.workloads.data.records import DataError, counts, write_jsonl
from runner.workloads.data.sets import train_val_records


def run(job: Any, run_dir: Path) -> int:
    """Import, dedupe and split; write train.jsonl, val.jsonl and manifest.json into the run directory."""
    spec = job.spec
    try:
        train, val, info = train_val_records(spec.data, base_dir=Path.cwd())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_dir / "train.jsonl", train)
    write_jsonl(run_dir / "val.jsonl", val)
    manifest = {
        "inputs": info["train_sources"] + info["val_sources"],
        "duplicates_removed": info["duplicates_removed"],
        "train_removed_as_in_val": info["train_removed_as_in_val"],
        "duplicates": info["duplicates"],
        "seed": spec.data.seed,
        "val_fraction": spec.data.val_fraction if not spec.data.val else None,
        "train": counts(train),
        "val": counts(val),
        "outputs": {
            name: {"path": name, "sha256": sha256_file(run_dir / name)} for name in ("train.jsonl", "val.jsonl")
        },
    }
    atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    bad = sum(len(s["bad_rows"]) for s in manifest["inputs"])
    if info["duplicates"]:
        n = len(info["duplicates"])
        print(f"dropped {n} duplicate record{'s' if n != 1 else ''} (see manifest.json)")
    print(
        f"prepared {len(train)} train / {len(val)} val records "
        f"({info['duplicates_removed']} duplicates removed, {bad} bad rows skipped) -> {run_dir}"
    )
    return 0
