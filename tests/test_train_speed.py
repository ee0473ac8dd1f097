"""The trainer's speed options change no result: every layout gives the same answer loss and LoRA gradients,
fused LoRA equals PEFT's own forward, and the compiled layers equal the eager ones (fp32, CPU)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from train_helpers import metrics, run_train, tiny_job, write_run_dir

from runner.spec.models import TinyModel
from runner.workloads.data.builtin import categories
from runner.workloads.data.records import MCQ
from runner.workloads.model.tiny import build_tiny_model
from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer
from runner.workloads.training.packing import (
    Example,
    answer_loss_sum,
    collate_grouped,
    collate_packed,
    collate_padded,
    encode_mcq,
    group_by_length,
    pack_rows,
    resolve_layout,
)


def _lora(dropout: float = 0.0) -> tuple[object, object, list[Example]]:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModel(hidden_size=64, layers=2, heads=4, seed=3), len(tok), tok.pad_token_id)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for n, p in peft.named_parameters():  # B starts at zero: give the update something to carry
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    recs = [MCQ.from_dict(d, default_id=str(i)) for i, d in enumerate(categories(per_topic=3))][:14]
    return tok, peft, [encode_mcq(tok, r, 256) for r in recs]


def _loss_grads(model: object, batches: list) -> tuple[float, dict[str, torch.Tensor]]:
    n = sum(len(b.targets) for b in batches)
    total = 0.0
    for b in batches:
        loss = answer_loss_sum(model, b) / n
        loss.backward()
        total += loss.item()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}  # type: ignore[attr-defined]
    model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    return total, grads


def _close(a: tuple[float, dict], b: tuple[float, dict], tol: float) -> None:
    assert abs(a[0] - b[0]) < tol, (a[0], b[0])
    worst = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    assert worst < tol, worst


def test_every_layout_gives_the_same_loss_and_gradients() -> None:
    from runner.workloads.model.packed_attention import enable_packed_attention

    tok, model, exs = _lora()
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    groups = group_by_length(exs, 320)
    assert 1 < len(groups) < len(exs) and sorted(map(len, exs)) == [len(e) for g in groups for e in g]
    assert all(len(g) * max(map(len, g)) <= 320 or len(g) == 1 for g in groups)
    ref = _loss_grads(model, [collate_padded([e], pad) for e in exs])  # each sample alone
    _close(ref, _loss_grads(model, [collate_padded(exs, pad)]), 1e-5)  # one padded batch, 2D mask
    grouped = [collate_grouped(g, pad) for g in groups]
    assert all(b.attention_mask is None for b in grouped)
    _close(ref, _loss_grads(model, grouped), 1e-5)
    rows = [[exs[i] for i in r] for r in pack_rows([len(e) for e in exs], 256)]
    _close(ref, _loss_grads(model, [collate_packed(rows, pad)]), 1e-5)
    assert enable_packed_attention(model)
    _close(ref, _loss_grads(model, [collate_packed(rows, pad, mask=False)]), 1e-5)


def test_fused_lora_equals_peft() -> None:
    from runner.workloads.model.fused_lora import fuse_lora

    tok, model, exs = _lora()
    batch = collate_grouped(exs, tok.pad_token_id)  # type: ignore[attr-defined]
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) == 2 * 7  # every adapted projection of both layers
    assert fuse_lora(fused) == 0  # idempotent
    _close(_loss_grads(model, [batch]), _loss_grads(fused, [batch]), 1e-5)
    with torch.no_grad():  # inference takes PEFT's own path, with the same result
        a = answer_loss_sum(model, batch)
        b = answer_loss_sum(fused, batch)
    assert torch.allclose(a, b, atol=1e-5)
    assert set(fused.state_dict()) == set(model.state_dict())  # type: ignore[attr-defined]  (saving unchanged)


def test_fused_lora_on_a_bf16_base_with_fp32_adapters_matches_peft() -> None:
    """The GPU setting: a bf16 base, PEFT's fp32 adapters. The base matmul runs in bf16 and the low-rank path in
    fp32, as in PEFT; loss and adapter gradients agree within bf16's noise (measured here: loss 2e-5 relative,
    gradients 7e-3 of their largest entry)."""
    from runner.workloads.model.fused_lora import fuse_lora

    tok, model, exs = _lora()
    for n, p in model.named_parameters():  # type: ignore[attr-defined]
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # type: ignore[attr-defined]
    batch = collate_grouped(exs, tok.pad_token_id)  # type: ignore[attr-defined]
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) == 2 * 7
    ref, got = _loss_grads(model, [batch]), _loss_grads(fused, [batch])
    assert abs(ref[0] - got[0]) < 2e-2 * max(1.0, abs(ref[0])), (ref[0], got[0])
    for k in ref[1]:
        assert got[1][k].dtype == torch.float32
        scale = ref[1][k].abs().max().item() + 1e-6
        assert (ref[1][k] - got[1][k]).abs().max().item() < 5e-2 * scale, k


def test_fused_lora_leaves_dropout_layers_to_peft() -> None:
    from runner.workloads.model.fused_lora import fuse_lora

    _, model, _ = _lora(dropout=0.1)
    assert fuse_lora(model) == 0


def test_auto_layout_per_device() -> None:
    assert resolve_layout("auto", True, "cpu") == "grouped"
    assert resolve_layout("auto", False, "cpu") == "padded"
    assert resolve_layout("packed", True, "cpu") == "packed"


@pytest.mark.slow
def test_compiled_layers_equal_eager() -> None:
    from runner.workloads.model.compiled import compile_layers
    from runner.workloads.model.fused_lora import fuse_lora

    tok, model, exs = _lora()
    pad = tok.pad_token_id  # type: ignore[attr-defined]
    batches = [collate_grouped(g, pad) for g in group_by_length(exs, 320)]
    fast = copy.deepcopy(model)
    fuse_lora(fast)
    assert compile_layers(fast) == 2
    _close(_loss_grads(model, batches), _loss_grads(fast, batches), 1e-5)
    with torch.no_grad():  # no-grad forwards run the eager layers (no recompile for validation)
        assert torch.allclose(answer_loss_sum(model, batches[0]), answer_loss_sum(fast, batches[0]), atol=1e-5)


@pytest.mark.slow
def test_train_jobs_in_every_layout_log_the_same_losses(tmp_path: Path) -> None:
    """Whole train jobs: the same steps and samples in each layout (and compiled) give the same per-step loss."""
    cache = Path(os.environ["RUNNER_CACHE"])
    losses = {}
    for name, train in [("grouped", {"layout": "grouped", "fused_lora": False}),
                        ("packed", {"layout": "packed", "fused_lora": False}),
                        ("varlen", {"layout": "varlen"}),
                        ("compiled", {"layout": "grouped", "compile": True})]:
        job = tiny_job(name, train={"steps": 4, "eval_every": 4, "save_every": 4, **train})
        run_dir = write_run_dir(tmp_path / name, job)
        rc, out = run_train(run_dir, cache)
        assert rc == 0, out
        assert f"layout {train['layout']}" in out
        losses[name] = [r["loss"] for r in metrics(run_dir, "train")]
    assert len(losses["grouped"]) == 4
    for name, got in losses.items():
        assert got == pytest.approx(losses["grouped"], abs=1e-5), name
