#!/usr/bin/env bash
# Every GPU measurement in one go, for a GPU machine without network access: CUDA PyTorch, transformers, peft
# and accelerate installed, and the serving packages (fastapi, uvicorn, pydantic, ruamel.yaml) importable.
#
#   bench/gpu_all.sh [serve|train|score|all]
#
# serve: the HTTP answer service on a random-init 7B-shaped model, 16 clients (micro-batched and one request
#        per forward) and one client alone; train: LoRA training throughput, 0.5B and 7B shapes, the project's
#        step (varlen attention, fused LoRA; grouped + torch.compile) against the competent plain HF + PEFT loops
#        (length-grouped answer-only, 4D-mask packing, DataCollatorWithFlattening) and the padded reference row,
#        all in one process; score: MCQ scoring methods, 7B shape.
# Results go to ${OUT:-bench/out}/ (text and JSON lines); copy the numbers into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RUNNER_CACHE=${RUNNER_CACHE:-/tmp/qa-runner-cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
what=${1:-all}


{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c 'import sys, torch, transformers, peft
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
import runner.workloads.model.packed_attention as pa
print("varlen attention:", pa.varlen_available(), sorted(pa._VARLEN_PARAMS))'
} 2>&1 | tee "$out/env.txt"

if [[ $what == serve || $what == all ]]; then
    SERVE_BENCH_DEVICE=cuda timeout 330 $py bench/serve_bench.py --shape 7b --requests 800 --lone --compare-graphs \
        2>&1 | tee "$out/serve_7b.txt"
fi
if [[ $what == train || $what == all ]]; then
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of words
    # The baselines run inside gpu_bench.py (same process); no baseline script is needed.
    timeout 420 $py bench/gpu_bench.py ${TRAIN_ARGS:---size 0.5b,7b} 2>&1 | tee "$out/train.jsonl"
fi
if [[ $what == score || $what == all ]]; then
    timeout 200 $py bench/gpu_score.py --size 7b --compile "" ${SCORE_ARGS:-} 2>&1 | tee "$out/score_7b.jsonl"
fi
