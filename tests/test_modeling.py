"""The offline tiny tokenizer and model: single-token answer letters, any text, cached base."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from runner.spec.models import LoraSpec, ModelSpec, TinyModel
from runner.workloads.model.loading import attach_lora, load_model_and_tokenizer
from runner.workloads.model.tiny import tiny_settings_hash
from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer, ensure_tiny_base
from runner.workloads.scoring.prompts import LETTERS
from runner.workloads.scoring.scorer import letter_token_ids, score_mcq

MMLU_Q = ("Statement 1 | If a and b are elements of finite order in an Abelian group, then |ab| is the lcm (|a|,|b|). "
          "Statement 2 | café, naïve — ∑ x² ≤ 10")


def test_letters_are_single_tokens_and_any_text_roundtrips() -> None:
    tok = build_tiny_tokenizer()
    ids = letter_token_ids(tok)
    assert len(set(ids)) == len(LETTERS)
    assert tok.decode(tok.encode(MMLU_Q)) == MMLU_Q
    assert tok.pad_token_id is not None


def test_tiny_base_cached_once_even_when_built_concurrently(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tiny = TinyModel(hidden_size=32, layers=1, heads=2, pretrain_steps=3)
    out: list[Path] = []
    ts = [threading.Thread(target=lambda: out.append(ensure_tiny_base(tiny, tmp_path, log=lambda m: None)))
          for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out[0] == out[1] == tmp_path / "tiny" / tiny_settings_hash(tiny)
    assert [p.name for p in (tmp_path / "tiny").iterdir() if p.is_dir()] == [out[0].name]  # no temp leftovers
    facts = json.loads((out[0] / "pretrain.json").read_text())
    assert facts["steps"] == 3
    spec = ModelSpec(base="tiny", tiny=tiny)
    model, tok = load_model_and_tokenizer(spec, "cpu", tmp_path)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 1
    peft = attach_lora(model, LoraSpec(r=2, alpha=4))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    item = type("Q", (), {"question": "What is a rivet?", "choices": ["a", "b", "c"]})()
    probs = score_mcq(peft, tok, [item])
    assert torch.allclose(probs.sum(-1), torch.ones(1)) and probs[0, 3:].sum() == 0


def test_missing_local_model_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model_and_tokenizer(ModelSpec(base=str(tmp_path / "nope")), "cpu", tmp_path)
