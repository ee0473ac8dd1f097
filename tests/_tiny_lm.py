"""A tiny random Qwen2 model and an offline byte-level BPE tokenizer (' A'..' J' single tokens) for scoring tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from runner.workloads.scoring.prompts import LETTERS

WORDS = (
    "what which is the of a an capital city river largest smallest number element planet animal color "
    "france paris berlin rome madrid water fire earth air red green blue two three four five six seven "
    "eight nine ten one hydrogen oxygen carbon gold iron mars venus jupiter cat dog horse fish bird"
).split()


@dataclass
class Item:
    question: str
    choices: list[str]
    answer: str = "A"
    id: str = ""
    topic: str = "t"
    source: str = "s"
    difficulty: str = "medium"
    extra: dict[str, Any] = field(default_factory=dict)


def make_items(n: int, n_choices: int | list[int], seed: int = 0) -> list[Item]:
    """Random questions of varied lengths (so batches need padding)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = n_choices if isinstance(n_choices, int) else rng.choice(n_choices)
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25))) + "?"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(k)]
        out.append(Item(q, choices, answer=LETTERS[rng.randrange(k)], id=f"q{i}", difficulty=rng.choice(
            ["easy", "medium", "hard"])))
    return out


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runner.workloads.scoring.prompts import format_prompt

    corpus = [format_prompt(it.question, it.choices) + " " + it.answer for it in make_items(300, [2, 4, 5, 10], 1)]
    corpus += [" " + L for L in LETTERS] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")


def model(seed: int = 0, hidden: int = 64, layers: int = 2, attn: str = "sdpa") -> Any:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform letters; larger weights make the probabilities differ per question.
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m.eval()
