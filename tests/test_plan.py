"""Plan rendering: pure, complete, quoted, secrets redacted."""

from __future__ import annotations

from pathlib import Path

import yaml

from runner.backends import plan_for
from runner.spec import load_job
from runner.templating import shell_word
from tests.conftest import ROOT, run_cli

JOB = "kind: train\nname: demo\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\n"


def job_file(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "demo.yaml"
    p.write_text(JOB + extra)
    return p


def test_cpu_train_plan_runs_the_workload_module(tmp_path: Path) -> None:
    p = plan_for(load_job(job_file(tmp_path)), workdir=str(tmp_path))
    assert p.argv == ["python", "-m", "runner.workloads"]
    assert p.env["RUNNER_WORKDIR"] == str(tmp_path) and p.env["RUNNER_JOB"] == "demo"
    acc = yaml.safe_load(p.files["accelerate.yaml"])
    assert acc["distributed_type"] == "NO" and acc["num_processes"] == 1 and acc["use_cpu"] is True
    assert acc["mixed_precision"] == "no"


def test_multi_gpu_plan_renders_fsdp_and_launches_accelerate(tmp_path: Path) -> None:
    f = job_file(tmp_path, "resources: {gpus: 8}\nimage: rocm\n")
    p = plan_for(load_job(f, ["model.base=Qwen/Qwen2.5-72B-Instruct", "model.dtype=bf16"]), backend="local")
    assert p.argv[:2] == ["accelerate", "launch"] and p.argv[-2:] == ["-m", "runner.workloads"]
    acc = yaml.safe_load(p.files["accelerate.yaml"])
    assert acc["distributed_type"] == "FSDP" and acc["num_processes"] == 8 and acc["mixed_precision"] == "bf16"
    assert acc["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert acc["fsdp_config"]["fsdp_use_orig_params"] is True  # frozen base + trainable LoRA in one FSDP unit
    assert p.env["PYTORCH_HIP_ALLOC_CONF"] == "expandable_segments:True"
    assert '"${RUNNER_RUN_DIR}/plan/accelerate.yaml"' in p.files["entrypoint.sh"]


def test_values_reaching_a_shell_are_quoted() -> None:
    assert shell_word("a b; rm -rf /") == "'a b; rm -rf /'"
    assert shell_word("${RUNNER_RUN_DIR}/x") == '"${RUNNER_RUN_DIR}/x"'
    assert shell_word("${RUNNER_RUN_DIR}/$(whoami)") == "'${RUNNER_RUN_DIR}/$(whoami)'"


def test_plan_cli_redacts_secrets_and_writes_nothing(tmp_path: Path, runner_home: Path) -> None:
    f = job_file(tmp_path, "env:\n  API_TOKEN: ${env:QA_PLAN_SECRET}\n  PLAIN: visible\n")
    p = run_cli("plan", str(f), env={"QA_PLAN_SECRET": "hunter2-very-secret"}, check=True)
    assert "API_TOKEN=***" in p.stdout and "PLAIN=visible" in p.stdout
    assert "hunter2-very-secret" not in p.stdout
    assert "# file: plan/accelerate.yaml" in p.stdout and "python -m runner.workloads" in p.stdout
    assert not runner_home.exists()


def test_plan_of_the_72b_job_shows_the_accelerate_config() -> None:
    p = run_cli("plan", str(ROOT / "jobs" / "train-72b.yaml"), "--backend", "local", check=True)
    assert "# file: plan/accelerate.yaml" in p.stdout and "accelerate launch" in p.stdout
    assert "mixed_precision: 'bf16'" in p.stdout
