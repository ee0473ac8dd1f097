# qa-runner tasks. Every recipe bootstraps .venv on first use (idempotent; later calls add well under 2 s).
set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments
# The CLI's own messages are the output: no echo of each command, no "recipe failed on line N" after an error
# (the exit code is still the command's).
set quiet
set no-exit-message

py := ".venv/bin/python"

# List the recipes.
default:
    @just --list

# Create .venv with torch (CPU build unless TORCH_SPEC says otherwise) and the project; skipped when up to date.
bootstrap:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp=".venv/.bootstrap-$(cat pyproject.toml | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && exit 0
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "qa-runner needs Python >= 3.11" >&2; exit 3; }
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # A GPU image already has its own torch build: never reinstall it. On a CPU machine, torch==2.13.0 is the CPU wheel.
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    fi
    .venv/bin/pip install --quiet -e '.[workloads,dev,cluster]'
    rm -f .venv/.bootstrap-*
    touch "$stamp"

# Run a job: just run jobs/quickstart.yaml [--set k=v] [--backend B] [--fresh] [--detach]
run JOB *ARGS: bootstrap
    {{py}} -m runner run "$@"

# Print everything a job would run, without running it.
plan JOB *ARGS: bootstrap
    {{py}} -m runner plan "$@"

# Validate job files (default: every job in jobs/).
validate *FILES: bootstrap
    #!/usr/bin/env bash
    set -euo pipefail
    if [ $# -eq 0 ]; then set -- jobs/*.yaml; fi
    {{py}} -m runner validate "$@"

# Build the real pretrained `smollm2-135m` base into $RUNNER_CACHE (one time, about a minute; instant when cached).
real-model: bootstrap
    {{py}} -m runner.workloads.model.smollm2

# The test suite (real Docker engine and Slurm tests run when those are up: see .ci/run).
test *ARGS: bootstrap
    {{py}} -m pytest "$@"

# Lint and type-check the host-side package.
lint: bootstrap
    .venv/bin/ruff check runner tests bench
    .venv/bin/mypy runner
    # What runs inside the ROCm image (its pinned base ships Python 3.10), and what it imports, must stay 3.10-compatible.
    .venv/bin/vermin -t=3.10- --no-tips --eval-annotations --violations runner/workloads runner/spec agents runner/runs.py runner/registry runner/stats.py runner/paths.py runner/files.py

# Benchmarks on this machine, as ratios against a baseline measured in the same process.
bench *ARGS: bootstrap
    {{py}} bench/run_all.py "$@"

# The runner's own CLI: just runner ls, just runner show RUN, ...
runner *ARGS: bootstrap
    {{py}} -m runner "$@"
