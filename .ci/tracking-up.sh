#!/usr/bin/env bash
# What the tracking tests (pytest -m mlflow) need: MLflow 3.x in the project venv (its server and client) and
# Debian's chromium for the headless browser check of the MLflow UI. Idempotent; says what it did.
set -euo pipefail
cd "$(dirname "$0")/.."

if .venv/bin/python -c 'import mlflow, sys; sys.exit(int(mlflow.__version__.split(".")[0]) != 3)' 2>/dev/null; then
    echo "tracking-up: mlflow $(.venv/bin/python -c 'import mlflow; print(mlflow.__version__)') already in .venv"
else
    echo "tracking-up: installing mlflow 3.x into .venv"
    .venv/bin/pip install --quiet 'mlflow>=3.4,<4'
fi

if command -v chromium >/dev/null 2>&1; then
    echo "tracking-up: $(chromium --version 2>/dev/null | head -1) already installed"
else
    echo "tracking-up: installing Debian's chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
    echo "tracking-up: $(chromium --version 2>/dev/null | head -1)"
fi
