"""Preflight: the memory model against known sizes and measured peaks, verdicts, and the run gate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runner.backends.base import EnvironmentProblem
from runner.preflight import report as pf
from runner.preflight.memory import GiB, Setup, allocated, estimate, total
from runner.preflight.probe import Hardware
from runner.preflight.shapes import KNOWN, known_key
from runner.spec import load_job
from tests.conftest import ROOT, run_cli

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NO_HW = Hardware(host_memory_bytes=16 * GiB)


@pytest.mark.parametrize(
    ("base", "key", "params_b"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b", 0.494),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b", 7.62),
        ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b", 72.7),
        ("Qwen/Qwen3-8B", "qwen3-8b", 8.19),
        ("Qwen/Qwen3-235B-A22B", "qwen3-235b-a22b", 235.1),
        ("Qwen/Qwen3-235B-A22B-Instruct-2507", "qwen3-235b-a22b", 235.1),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b", 8.03),
        ("meta-llama/Meta-Llama-3-70B-Instruct", "llama-3.1-70b", 70.55),
        ("meta-llama/Llama-3.2-1B", "llama-3.2-1b", 1.24),
    ],
)
def test_param_counts_match_published_sizes(base: str, key: str, params_b: float) -> None:
    assert known_key(base) == key
    assert KNOWN[key].params() / 1e9 == pytest.approx(params_b, rel=0.01)


def test_72b_weights_and_verdict_on_one_mi300x() -> None:
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"))
    rep = pf.preflight(job, hardware=NO_HW)
    weights = rep.components[0]
    assert weights.name == "weights (bf16)"
    assert weights.bytes == pytest.approx(72.7e9 * 2, rel=0.03)
    assert rep.setup is not None and rep.setup.gradient_checkpointing
    assert rep.fits is True and rep.ok
    assert rep.total_bytes <= 192 * GiB
    assert "FITS on 1 x mi300x" in rep.render()
    # Without gradient checkpointing the same job cannot fit, and preflight says what would.
    job2 = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["model.gradient_checkpointing=false"])
    rep2 = pf.preflight(job2, hardware=NO_HW)
    assert rep2.fits is False
    assert any(s.startswith("model.gradient_checkpointing: true") for s in rep2.suggestions)


def test_235b_is_rejected_with_numbers_and_alternatives() -> None:
    p = run_cli("preflight", "jobs/train-235b.yaml")
    assert p.returncode == 3, p.stdout + p.stderr
    out = p.stdout
    assert "DOES NOT FIT" in out
    assert "470.2 GB" in out  # the bf16 weights alone
    assert "235.09 B params" in out
    assert "resources.gpus:" in out and "a smaller model: Qwen3-" in out


def test_preflight_cli_is_fast_and_never_imports_torch() -> None:
    t0 = time.monotonic()
    p = run_cli("preflight", "jobs/train-72b.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert time.monotonic() - t0 < 10
    assert "hardware here:" in p.stdout and "weights (bf16)" in p.stdout
    code = "import sys, runner.preflight.probe as p; p.probe_hardware(docker=False); print('torch' in sys.modules)"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def plain_hf(tokens: int, gc: bool, r: int = 16, dropout: float = 0.0) -> Setup:
    """The GPU setup of the measured plain HF + PEFT loop: loss (and full-vocabulary logits) at every position."""
    return Setup("bf16", tokens, gc, r, ALL, dropout, 1, full_logits=True)


# Measured on one H200 with the plain HF + PEFT loop (LoRA r=16 on all seven projections, bf16, SDPA, loss on every
# token): torch.cuda.max_memory_allocated in GiB, from BENCHMARKS.md.
MEASURED = [
    ("qwen2.5-0.5b", 4 * 4096, False, 64.0),
    ("qwen2.5-7b", 2 * 4096, False, 100.0),
    ("qwen2.5-7b", 8 * 1024, False, 100.0),
    ("qwen2.5-7b", 4 * 4096, True, 46.0),
]


# Re-measured with tests/measure_memory.py on one H200 (torch 2.11, transformers 5.17, peft): other shapes,
# LoRA r=64 with dropout as jobs/train-72b.yaml uses, Qwen3 and Llama. (model, tokens, gc, r, dropout, GiB)
MEASURED_H200 = [
    ("qwen2.5-0.5b", 4 * 4096, False, 16, 0.0, 58.91),
    ("qwen2.5-7b", 2 * 4096, False, 16, 0.0, 97.29),
    ("qwen2.5-7b", 4 * 4096, True, 16, 0.0, 45.89),
    ("qwen2.5-7b", 4 * 2048, True, 64, 0.05, 31.67),
    ("qwen3-8b", 2 * 2048, False, 16, 0.0, 63.37),
    ("llama-3.2-1b", 8 * 1024, False, 16, 0.0, 33.56),
]


@pytest.mark.parametrize(("key", "tokens", "gc", "peak_gib"), MEASURED)
def test_memory_model_within_15_percent_of_measured_peaks(key: str, tokens: int, gc: bool, peak_gib: float) -> None:
    est = allocated(estimate(KNOWN[key], plain_hf(tokens, gc)))
    assert est / GiB == pytest.approx(peak_gib, rel=0.15)


@pytest.mark.parametrize(("key", "tokens", "gc", "r", "dropout", "peak_gib"), MEASURED_H200)
def test_memory_model_matches_remeasured_shapes(key: str, tokens: int, gc: bool, r: int, dropout: float,
                                                peak_gib: float) -> None:
    est = allocated(estimate(KNOWN[key], plain_hf(tokens, gc, r, dropout)))
    assert est / GiB == pytest.approx(peak_gib, rel=0.05)


@pytest.mark.parametrize(("key", "batch", "peak_gib"), [("qwen2.5-0.5b", 16, 45.0), ("qwen2.5-7b", 8, 68.0)])
def test_padded_batches_are_bounded_by_the_worst_case(key: str, batch: int, peak_gib: float) -> None:
    # Padded batches were at most 1024 tokens long: the estimate at max_seq_len is an upper bound.
    est = allocated(estimate(KNOWN[key], plain_hf(batch * 1024, False)))
    assert est / GiB >= peak_gib


def test_sharding_over_more_gpus_divides_the_weights() -> None:
    a = KNOWN["qwen3-235b-a22b"]
    one = estimate(a, Setup("bf16", 4096, True, 16, ALL, 0.0, 1))
    four = estimate(a, Setup("bf16", 4096, True, 16, ALL, 0.0, 4))
    assert four[0].bytes == pytest.approx(one[0].bytes / 4)
    assert total(four) < 192 * GiB < total(one)


def test_known_broken_rocm_combinations_are_errors() -> None:
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["model.attn_implementation=flash_attention_2"])
    rep = pf.preflight(job, hardware=NO_HW)
    assert not rep.ok
    assert any("flash-attn has no prebuilt ROCm 6.2 wheel" in e for e in rep.errors)
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["image=cuda"])
    assert any("cannot drive a mi300x" in e for e in pf.preflight(job, hardware=NO_HW).errors)


def test_config_json_in_the_hf_cache_wins_over_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = tmp_path / "hub" / "models--acme--Widget-3B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 10, "num_attention_heads": 16,
        "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000, "tie_word_embeddings": False,
    }))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["model.base=acme/Widget-3B"])
    rep = pf.preflight(job, hardware=NO_HW)
    assert rep.arch is not None and "config.json" in rep.arch.source
    assert rep.arch.params() == 10 * (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048) + 2 * 32000 * 2048 + 2048


def test_unknown_model_asks_for_params_b_and_params_b_gives_an_estimate() -> None:
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["model.base=acme/mystery"])
    rep = pf.preflight(job, hardware=NO_HW)
    assert rep.fits is None and any("model.params_b" in w for w in rep.warnings)
    job = load_job(str(ROOT / "jobs" / "train-72b.yaml"), ["model.base=acme/mystery", "model.params_b=70"])
    rep = pf.preflight(job, hardware=NO_HW)
    assert rep.components[0].bytes == pytest.approx(140e9, rel=0.1)


def test_gate_refuses_a_job_that_cannot_fit_unless_forced() -> None:
    from runner.backends import plan_for

    job = load_job(str(ROOT / "jobs" / "train-235b.yaml"), backend="local")
    plan = plan_for(job, "local")
    with pytest.raises(EnvironmentProblem, match=r"DOES NOT FIT.*437\.9 GiB"):
        pf.gate(job, plan)
    assert pf.gate(job, plan, force=True) is None


# --- the project's trainer (answer logits, layouts, a CPU process) -------------------------------------------


def test_this_trainer_charges_logits_at_the_answers_only() -> None:
    a = KNOWN["qwen2.5-0.5b"]
    ours = {c.name: c.bytes for c in estimate(a, Setup("bf16", 4 * 4096, False, 16, ALL, 0.0, 1))}
    plain = {c.name: c.bytes for c in estimate(a, plain_hf(4 * 4096, False))}
    # One answer per 32 tokens by default, 16 bytes per vocabulary entry; a plain loop: every position, 12 bytes.
    assert ours["answer logits + loss"] == 512 * a.vocab * 16
    assert plain["logits + loss"] == 4 * 4096 * a.vocab * 12
    assert ours["activations"] == plain["activations"]
    short = estimate(a, Setup("bf16", 4 * 4096, False, 16, ALL, 0.0, 1, sample_tokens=64))
    assert {c.name: c.bytes for c in short}["answer logits + loss"] == 256 * a.vocab * 16


def _smollm2_cpu(*overrides: str) -> pf.Report:
    job = load_job(str(ROOT / "jobs" / "quickstart-smollm2.yaml"), list(overrides))
    return pf.preflight(job, hardware=NO_HW)


def test_a_cpu_job_is_the_trainer_process_in_its_resolved_layout() -> None:
    rep = _smollm2_cpu()
    assert rep.setup is not None and rep.setup.cpu and rep.setup.layout == "grouped" and rep.setup.dtype == "fp32"
    parts = {c.name: c.bytes for c in rep.components}
    assert parts["runtime + allocator"] == 450 * 1024**2  # Python + torch + tokenizer, no GPU context, no slack
    assert parts["weights (fp32)"] == pytest.approx(134.5e6 * 4, rel=0.01)
    text = rep.render()
    assert "layout grouped" in text and "total (process RSS)" in text and "per GPU" not in text
    # 4 rows x 256 tokens: 1024 tokens x 30 layers, ~1.7 MiB a token (measured 2.5-2.6 GiB peak RSS in all).
    assert parts["activations"] / 1024 / 1024**2 == pytest.approx(1.68, rel=0.03)
    assert 2.5 * GiB < rep.total_bytes < 2.85 * GiB


def test_layouts_and_options_change_the_cpu_estimate_where_they_change_memory() -> None:
    grouped = _smollm2_cpu()
    packed = _smollm2_cpu("train.layout=packed", "train.batch_size=2", "train.max_seq_len=512")
    parts = {c.name: c.bytes for c in packed.components}
    assert parts["attention mask (packed)"] == 2 * 512 * 512 * 4  # [B, 1, T, T] fp32
    assert parts["activations"] > {c.name: c.bytes for c in grouped.components}["activations"]
    peft = _smollm2_cpu("train.fused_lora=false")
    assert peft.total_bytes > grouped.total_bytes
    unpacked = _smollm2_cpu("train.packing=false")
    assert unpacked.setup is not None and unpacked.setup.layout == "padded"
    gc = _smollm2_cpu("model.gradient_checkpointing=true")
    assert gc.total_bytes < grouped.total_bytes
    gpu = load_job(str(ROOT / "jobs" / "train-72b.yaml"))
    rep = pf.preflight(gpu, hardware=NO_HW)
    assert rep.setup is not None and rep.setup.layout == "varlen" and not rep.setup.cpu


def test_compiled_layers_on_a_cpu_save_less_and_pay_for_inductor() -> None:
    eager = {c.name: c.bytes for c in _smollm2_cpu().components}
    compiled = {c.name: c.bytes for c in _smollm2_cpu("train.compile=true").components}
    assert compiled["activations"] < eager["activations"]
    assert compiled["torch.compile (inductor)"] == 240 * 1024**2
    varlen = {c.name for c in _smollm2_cpu("train.compile=true", "train.layout=varlen").components}
    assert "torch.compile (inductor)" not in varlen  # the trainer compiles no varlen layers
