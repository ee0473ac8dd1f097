"""Packed rows give exactly the per-sample answer losses of the samples run alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.spec.models import TinyModel
from runner.workloads.data.builtin import categories
from runner.workloads.data.records import MCQ
from runner.workloads.model.tiny import build_tiny_model
from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer
from runner.workloads.training.packing import (
    collate_packed,
    collate_padded,
    encode_mcq,
    pack_rows,
    per_token_losses,
)


@pytest.fixture(scope="module")
def tok_model() -> tuple[object, object]:
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TinyModel(hidden_size=64, layers=2, heads=4, seed=3), len(tok), tok.pad_token_id)
    model.eval()
    return tok, model


def _examples(tok: object, n: int) -> list:
    recs = [MCQ.from_dict(d, default_id=str(i)) for i, d in enumerate(categories(per_topic=3))][:n]
    return [encode_mcq(tok, r, 256) for r in recs]


def test_packed_loss_equals_alone(tok_model: tuple[object, object]) -> None:
    tok, model = tok_model
    exs = _examples(tok, 12)
    rows = pack_rows([len(e) for e in exs], 160)
    assert len(rows) < len(exs)  # really packed: several samples per row
    with torch.no_grad():
        packed = per_token_losses(model, collate_packed([[exs[i] for i in r] for r in rows], tok.pad_token_id))
        alone = torch.cat([per_token_losses(model, collate_padded([e], tok.pad_token_id)) for e in exs])
    order = [i for r in rows for i in r]
    assert torch.allclose(packed, alone[torch.tensor(order)], atol=1e-4), (packed - alone[torch.tensor(order)]).abs().max()


def test_mask_free_packed_rows_equal_masked_rows() -> None:
    """The varlen layout (no 4D mask, sample lengths instead; on a CPU one causal SDPA per sample) gives the masked
    rows' answer losses and LoRA gradients, pad tails included."""
    from peft import LoraConfig, get_peft_model

    from runner.workloads.model.packed_attention import enable_packed_attention
    from runner.workloads.training.packing import answer_loss_sum, resolve_layout

    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    exs = _examples(tok, 12)
    rows = [[exs[i] for i in r] for r in pack_rows([len(e) for e in exs], 200)]
    grads = []
    for mask in (True, False):
        torch.manual_seed(0)
        base = build_tiny_model(TinyModel(hidden_size=64, layers=2, heads=4, seed=3), len(tok), tok.pad_token_id)
        assert enable_packed_attention(base)
        assert resolve_layout("auto", True, "cpu") != "varlen"  # on a CPU training is mask-free only when told
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
        batch = collate_packed(rows, tok.pad_token_id, row_len=220, mask=mask)
        assert (batch.attention_mask is None) is (not mask) and sum(batch.seq_lens) == batch.input_ids.numel()
        loss = answer_loss_sum(model, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4)


def test_position_ids_alone_would_leak(tok_model: tuple[object, object]) -> None:
    """Why the mask exists: with only restarting position ids, the second sample sees the first."""
    tok, model = tok_model
    exs = _examples(tok, 2)
    b = collate_packed([exs], tok.pad_token_id)
    with torch.no_grad():
        leaky = model(input_ids=b.input_ids, position_ids=b.position_ids, logits_to_keep=b.loss_mask).logits
        exact = model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask,
                      logits_to_keep=b.loss_mask).logits
    assert (leaky.reshape(2, -1)[1] - exact.reshape(2, -1)[1]).abs().max() > 1e-3


def test_padded_batch_matches_alone(tok_model: tuple[object, object]) -> None:
    tok, model = tok_model
    exs = _examples(tok, 5)
    with torch.no_grad():
        batch = per_token_losses(model, collate_padded(exs, tok.pad_token_id))
        alone = torch.cat([per_token_losses(model, collate_padded([e], tok.pad_token_id)) for e in exs])
    assert torch.allclose(batch, alone, atol=1e-4)


def test_pack_rows_never_overflows() -> None:
    lengths = [30, 50, 20, 90, 10, 100, 5]
    rows = pack_rows(lengths, 100)
    assert [i for r in rows for i in r] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    with pytest.raises(ValueError):
        pack_rows([101], 100)


def test_long_prompt_truncated_keeps_answer(tok_model: tuple[object, object], tmp_path: Path) -> None:
    tok, _ = tok_model
    rec = MCQ(id="x", question="word " * 400, choices=["a", "b"], answer="B")
    ex = encode_mcq(tok, rec, 64)
    assert len(ex) == 64 and tok.decode(ex.ids[ex.label_start:]) == " B"
