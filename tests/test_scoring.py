"""Batched single-pass scoring equals a slow one-question-at-a-time reference; the per-choice cross-check too."""

from __future__ import annotations

import _tiny_lm as tiny
import pytest
import torch

from runner.workloads.model.packed_attention import PACKED_ATTENTION, enable_packed_attention
from runner.workloads.scoring.prompts import format_prompt, strip_choice_prefix
from runner.workloads.scoring.scorer import length_batches, letter_token_ids, score_mcq, score_mcq_per_choice

torch.set_num_threads(1)


@torch.no_grad()
def reference_letters(model, tok, items) -> torch.Tensor:
    """One question at a time, no padding, full logits: softmax over the item's own letters."""
    letters = letter_token_ids(tok)
    out = torch.zeros(len(items), 10)
    for i, it in enumerate(items):
        ids = torch.tensor([tok.encode(format_prompt(it.question, it.choices))])
        logits = model(input_ids=ids).logits[0, -1]
        k = len(it.choices)
        out[i, :k] = logits[letters[:k]].softmax(-1)
    return out


@torch.no_grad()
def reference_per_choice(model, tok, items) -> torch.Tensor:
    out = torch.zeros(len(items), 10)
    for i, it in enumerate(items):
        ctx = tok.encode(format_prompt(it.question, it.choices))
        lls = []
        for c in it.choices:
            cont = tok.encode(" " + strip_choice_prefix(c), add_special_tokens=False)
            logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            lls.append(sum(float(logp[len(ctx) - 1 + t, cont[t]]) for t in range(len(cont))))
        out[i, : len(lls)] = torch.tensor(lls).softmax(-1)
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny.model(seed=1)


@pytest.mark.parametrize("padding", ["right", "left", "auto"])
@pytest.mark.parametrize("n_choices", [2, 4, 5, [2, 4, 5, 10]])
def test_batched_equals_reference(model, tok, padding, n_choices):
    items = tiny.make_items(23, n_choices, seed=7)
    lengths = {len(tok.encode(format_prompt(it.question, it.choices))) for it in items}
    assert len(lengths) > 5, "the items must differ in length so batches are padded"
    ref = reference_letters(model, tok, items)
    got = score_mcq(model, tok, items, batch_size=6, padding=padding)
    assert got.shape == (23, 10) and got.device.type == "cpu"
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # Letters past an item's choices get exactly zero; each row sums to one.
    for i, it in enumerate(items):
        assert torch.all(got[i, len(it.choices) :] == 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(23))
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_eager_attention_and_token_budget(tok):
    m = tiny.model(seed=2, attn="eager")
    items = tiny.make_items(17, 4, seed=3)
    ref = reference_letters(m, tok, items)
    got = score_mcq(m, tok, items, batch_size=64, max_batch_tokens=120)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_lora_wrapped_model_uses_adapter(model, tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny.model(seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # a trained adapter: it must change the scores
    items = tiny.make_items(12, 4, seed=4)
    ref = reference_letters(peft_model, tok, items)
    got = score_mcq(peft_model, tok, items, batch_size=5)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    base = score_mcq(model, tok, items, batch_size=5)
    assert not torch.allclose(got, base, atol=1e-3)


@pytest.mark.parametrize("layers", [1, 3])
def test_packed_equals_reference(tok, layers):
    """Prompts packed into one row (per-prompt causal attention, last layer only at the answer positions) score
    exactly like one question at a time, for plain and LoRA-wrapped models, under a row token cap too."""
    from peft import LoraConfig, get_peft_model

    items = tiny.make_items(29, [2, 4, 5, 10], seed=11)
    m = tiny.model(seed=3, layers=layers)
    ref = reference_letters(m, tok, items)
    assert enable_packed_attention(m) and m.config._attn_implementation == PACKED_ATTENTION
    assert enable_packed_attention(m)  # idempotent: hooks are not stacked
    for kw in ({"batch_size": 8}, {"batch_size": 64, "max_batch_tokens": 90}, {"batch_size": 1}):
        got = score_mcq(m, tok, items, padding="packed", **kw)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(score_mcq(m, tok, items, batch_size=8), ref, atol=2e-5, rtol=1e-4)  # auto on CPU

    torch.manual_seed(0)
    pm = get_peft_model(tiny.model(seed=3, layers=layers), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    pref = reference_letters(pm, tok, items)
    assert enable_packed_attention(pm)
    torch.testing.assert_close(score_mcq(pm, tok, items, batch_size=7, padding="packed"), pref, atol=2e-5, rtol=1e-4)


def test_packed_attention_leaves_other_forwards_unchanged(tok):
    """Once enabled, the model's ordinary forwards (full logits, padded batches with a mask) are unchanged."""
    m = tiny.model(seed=4)
    ids = torch.randint(2, len(tok), (3, 21))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        before = m(input_ids=ids, attention_mask=mask).logits
        enable_packed_attention(m)
        after = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_packed_needs_preparation_and_sdpa(model, tok):
    items = tiny.make_items(3, 4)
    with pytest.raises(ValueError, match="enable_packed_attention"):
        score_mcq(tiny.model(seed=5), tok, items, padding="packed")
    assert not enable_packed_attention(tiny.model(seed=5, attn="eager"))


def test_per_choice_equals_reference(model, tok):
    items = tiny.make_items(9, [2, 4, 5], seed=5)
    ref = reference_per_choice(model, tok, items)
    got = score_mcq_per_choice(model, tok, items, batch_size=7)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_order_preserved_and_model_mode_restored(model, tok):
    items = tiny.make_items(10, 4, seed=6)
    model.train()
    fwd = score_mcq(model, tok, items, batch_size=3)
    assert model.training
    model.eval()
    rev = score_mcq(model, tok, items[::-1], batch_size=4)
    torch.testing.assert_close(rev, fwd.flip(0), atol=1e-6, rtol=1e-5)
    assert score_mcq(model, tok, [], batch_size=4).shape == (0, 10)


def test_bad_inputs_are_clear(model, tok):
    with pytest.raises(ValueError, match="choices"):
        score_mcq(model, tok, [tiny.Item("q?", ["only one"])])
    with pytest.raises(ValueError, match="batch_size"):
        score_mcq(model, tok, tiny.make_items(2, 4), batch_size=0)


def test_length_batches_bounded_and_cut_where_lengths_jump():
    lengths = [5, 50, 7, 49, 6, 51, 8]
    batches = length_batches(lengths, batch_size=3, batch_overhead_tokens=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) <= 3 for b in batches)
    # The long and short questions never share a batch (that would pad the short ones to 50 tokens).
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    capped = length_batches(lengths, batch_size=10, max_batch_tokens=100)
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in capped)
    assert length_batches([500, 3], batch_size=4, max_batch_tokens=100) == [[0], [1]]


def test_length_batches_pad_less_than_fixed_size_batches():
    import random

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5.0, 0.5)) for _ in range(2000)]
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    srt = sorted(range(2000), key=lambda i: -lengths[i])
    fixed = [srt[s : s + 128] for s in range(0, 2000, 128)]
    ours = length_batches(lengths, batch_size=512, max_batch_tokens=128 * 200)
    assert sum(lengths) / padded(ours) > 0.93
    assert padded(ours) < 0.95 * padded(fixed)
