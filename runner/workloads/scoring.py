"""Single-pass MCQ scoring: one forward pass per question, read the choice-letter logits at the answer position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from runner.workloads.prompts import LETTERS, answer_text, format_prompt


def letter_token_ids(tokenizer: Any, n: int = len(LETTERS)) -> list[int]:
    """Token id of ' A', ' B', ... (each must be a single token for single-pass scoring)."""
    ids = []
    for letter in LETTERS[:n]:
        toks = tokenizer.encode(answer_text(letter), add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"tokenizer splits {answer_text(letter)!r} into {len(toks)} tokens; need exactly one")
        ids.append(toks[0])
    return ids


@torch.no_grad()
def score_mcq(model: Any, tokenizer: Any, items: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Letter probabilities, shape [len(items), 10]: softmax over each item's own letters, zero elsewhere.

    `items` have `.question` and `.choices` (MCQ records). Batches are sorted by length and left-padded
    so the answer position is the last one; results come back in the input order.
    """
    device = next(model.parameters()).device
    letters = torch.tensor(letter_token_ids(tokenizer), device=device)
    prompts = [tokenizer.encode(format_prompt(it.question, it.choices)) for it in items]
    n_choices = torch.tensor([len(it.choices) for it in items])
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(items), len(LETTERS), device=device)
    was_training = model.training
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, T - len(p) :] = torch.tensor(p)
            att[r, T - len(p) :] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device), logits_to_keep=1
        ).logits[:, -1, :]
        letter_logits = logits.float().index_select(-1, letters)
        mask = torch.arange(len(LETTERS)).unsqueeze(0) >= n_choices[idx].unsqueeze(1)
        letter_logits = letter_logits.masked_fill(mask.to(device), float("-inf"))
        out[torch.tensor(idx, device=device)] = letter_logits.softmax(-1)
    if was_training:
        model.train()
    return out.cpu()
