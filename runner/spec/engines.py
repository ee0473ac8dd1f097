"""Which engine runs an agent's model: the builtin scorer (transformers in this process), vLLM (its
OpenAI-compatible server as a child process on a loopback port) or llama.cpp (a GGUF file, in process). The
project's service stays in front of each as the gate: same endpoints, validation, deadlines and metrics."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from runner.spec.section import Section

EngineName = Literal["builtin", "vllm", "llamacpp"]
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
ENGINE_DESCRIPTION = (
    "What runs the model: `builtin` (transformers in the service's process), `vllm` (vLLM's OpenAI-compatible "
    "server, started by the runner as a child process on a loopback port, with the adapter as a LoRA module) or "
    "`llamacpp` (a GGUF file of a registry version, through llama-cpp-python). The service in front is the same."
)
_PATHLIKE = re.compile(r"^[A-Za-z0-9_./+@:=-]+$")


class VllmSpec(Section):
    """Flags of the `vllm serve` child process. Each maps to one `vllm serve` option (shown by `runner plan`)."""

    python: str | None = Field(
        None, description="Python of the environment that has vLLM (default: `$QA_VLLM_PYTHON`, then "
        "`.venv-vllm/bin/python` beside the project, then the image's own `python3`)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="`--dtype`: `auto` is bfloat16 on a GPU and on CPU."
    )
    max_model_len: int = Field(2048, ge=64, le=1_048_576, description="`--max-model-len` (tokens).")
    tensor_parallel_size: int = Field(1, ge=1, le=8, description="`--tensor-parallel-size` (GPUs per replica).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.05, le=0.99, description="`--gpu-memory-utilization`: share of GPU memory vLLM may take."
    )
    max_num_seqs: int = Field(64, ge=1, le=4096, description="`--max-num-seqs`: sequences batched together.")
    max_num_batched_tokens: int | None = Field(
        None, ge=64, le=1_048_576, description="`--max-num-batched-tokens`: tokens one engine step takes (default: "
        "vLLM's for the platform)."
    )
    max_lora_rank: int | None = Field(
        None, ge=1, le=512, description="`--max-lora-rank` (default: the adapter's r, rounded up to what vLLM takes)."
    )
    enforce_eager: bool | None = Field(
        None, description="`--enforce-eager` (no CUDA/HIP graphs). Default: on for CPU, off on a GPU."
    )
    cpu_kvcache_gb: float = Field(2.0, gt=0, le=512, description="KV cache size on CPU (`VLLM_CPU_KVCACHE_SPACE`, GiB).")
    rocm_aiter: bool = Field(True, description="On ROCm, `VLLM_ROCM_USE_AITER=1` (AMD's AITER kernels).")
    startup_timeout_s: float = Field(900.0, gt=0, le=7200, description="How long the server may take to come up.")

    @field_validator("python")
    @classmethod
    def _python(cls, v: str | None) -> str | None:
        if v is not None and not _PATHLIKE.match(v):
            raise ValueError(f"python {v!r}: a path to a Python executable (letters, digits, ._/+@:=- only)")
        return v


class LlamaCppSpec(Section):
    """The GGUF file llama.cpp serves and how it runs."""

    gguf: str = Field(
        "q8_0", description="Which GGUF of the registry version (its type, as promoted with `--gguf`), or a path "
        "to a `.gguf` file."
    )
    n_ctx: int = Field(2048, ge=64, le=1_048_576, description="Context length (tokens).")
    n_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (default: llama.cpp's).")
    n_gpu_layers: int = Field(0, ge=-1, le=1000, description="Layers offloaded to a GPU (-1: all), in a GPU build.")

    @field_validator("gguf")
    @classmethod
    def _gguf(cls, v: str) -> str:
        if v.endswith(".gguf"):
            if not _PATHLIKE.match(v):
                raise ValueError(f"gguf {v!r}: a path with letters, digits and ._/+@:=- only")
            return v
        if v not in GGUF_TYPES:
            raise ValueError(f"gguf {v!r}: a GGUF type ({', '.join(GGUF_TYPES)}) or a path ending in .gguf")
        return v
