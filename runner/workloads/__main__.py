"""Entry point of every workload: reads $RUNNER_RUN_DIR/job.yaml and runs the job's kind."""

from __future__ import annotations

import faulthandler
import importlib
import os
import sys
from pathlib import Path

# job kind -> its recipe, a module exposing `run(job, run_dir) -> int`; imported only for the kind that runs.
RECIPES = {
    "prepare": "runner.workloads.recipes.prepare",
    "train": "runner.workloads.recipes.train",
    "eval": "runner.workloads.recipes.eval",
    "serve": "runner.workloads.recipes.serve",
    "tournament": "runner.workloads.recipes.tournament",
}


def main() -> int:
    faulthandler.enable()  # a native crash (a CUDA fault, a segfault) still leaves a Python traceback in the log
    run_dir = Path(os.environ.get("RUNNER_RUN_DIR", ".")).resolve()
    job_file = run_dir / "job.yaml"
    if not job_file.exists():
        print(f"error: {job_file} not found (set RUNNER_RUN_DIR to a run directory)", file=sys.stderr)
        return 2
    from ruamel.yaml import YAML

    from runner.spec import SpecError, job_from_stored

    data = YAML(typ="safe").load(job_file.read_text())
    data.pop("spec_hash", None)
    try:
        job = job_from_stored(data, str(job_file))
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    module = RECIPES.get(job.kind)
    if module is None:
        print(f"error: no recipe for kind {job.kind!r}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one lock per run, held by its rank-0 process
        from runner.runs import RunError, hold_workload_lock

        try:
            hold_workload_lock(run_dir)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from runner.workloads.training.progress import quiet_libraries

    quiet_libraries()  # every kind's log shows its own progress, not the libraries' bars and notices
    return int(importlib.import_module(module).run(job, run_dir) or 0)


if __name__ == "__main__":
    sys.exit(main())
