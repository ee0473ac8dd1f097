"""Calibration and position bias of MCQ letter probabilities: ECE, Brier, reliability bins, the letter-prior bias
(accuracy with the gold answer moved to each position) and permutation debiasing (cyclic shifts of the choices).

Probabilities are `[n, 10]` tensors (zero past an item's choices); `gold` holds each item's answer index.
Bias and debiasing take a `score_fn(items) -> probs` so they work with any scorer (and any ensemble member).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runner.workloads.scoring.prompts import LETTERS

ScoreFn = Callable[[Sequence[Any]], torch.Tensor]


@dataclass
class Shuffled:
    """A question with its choices reordered (what the scorer sees)."""

    question: str
    choices: list[str]


def _check(probs: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = probs.detach().float().cpu()
    gold = torch.as_tensor(gold).long().cpu()
    if probs.ndim != 2 or gold.shape != (probs.shape[0],):
        raise ValueError(f"expected probs [n, k] and gold [n], got {tuple(probs.shape)} and {tuple(gold.shape)}")
    return probs, gold


def confidence_correct(probs: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence and whether the top label is the gold one."""
    probs, gold = _check(probs, gold)
    conf, pred = probs.max(-1)
    return conf, (pred == gold).float()


def reliability_bins(probs: torch.Tensor, gold: torch.Tensor, bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins (lo, hi]: count, mean confidence and accuracy of each non-empty bin."""
    conf, correct = confidence_correct(probs, gold)
    edges = torch.linspace(0.0, 1.0, bins + 1)
    # Bin i holds lo < conf <= hi; a confidence of exactly 0 (impossible for a softmax) goes to the first bin.
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        if n:
            out.append({
                "lo": round(float(edges[b]), 6), "hi": round(float(edges[b + 1]), 6), "n": n,
                "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean()),
            })
    return out


def expected_calibration_error(probs: torch.Tensor, gold: torch.Tensor, bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    n = probs.shape[0]
    if n == 0:
        return 0.0
    return sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, gold, bins))


def brier_score(probs: torch.Tensor, gold: torch.Tensor) -> float:
    """Multi-class Brier score: mean over questions of sum_k (p_k - [k == gold])^2 (0 best, 2 worst)."""
    probs, gold = _check(probs, gold)
    if probs.shape[0] == 0:
        return 0.0
    onehot = torch.zeros_like(probs).scatter_(1, gold.unsqueeze(1), 1.0)
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(probs: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean negative log-probability of the gold answer (clamped at 1e-12)."""
    probs, gold = _check(probs, gold)
    if probs.shape[0] == 0:
        return 0.0
    return float(-probs.gather(1, gold.unsqueeze(1)).clamp_min(1e-12).log().mean())


def prediction_shares(probs: torch.Tensor, gold: torch.Tensor, n_choices: Sequence[int]) -> dict[str, dict[str, float]]:
    """How often each letter is predicted against how often it is the answer (a free look at position bias)."""
    probs, gold = _check(probs, gold)
    pred = probs.argmax(-1)
    n = max(probs.shape[0], 1)
    k = max(n_choices, default=0)
    return {
        LETTERS[j]: {"predicted": float((pred == j).sum()) / n, "gold": float((gold == j).sum()) / n}
        for j in range(k)
    }


def _cost(passes: int, questions: int, seconds: float) -> dict[str, float]:
    return {"passes": passes, "questions_scored": questions, "seconds": round(seconds, 3)}


def letter_bias(
    score_fn: ScoreFn, items: Sequence[Any], gold: Sequence[int]
) -> dict[str, Any]:
    """Accuracy when the gold answer is moved to each position (swapped with the choice there).

    An unbiased model scores the same at every position; `spread` is the best minus the worst position.
    Position k is measured on the items that have more than k choices.
    """
    t0 = time.perf_counter()
    k_max = max((len(it.choices) for it in items), default=0)
    by_pos: dict[str, dict[str, float]] = {}
    scored = 0
    for k in range(k_max):
        sub = [i for i, it in enumerate(items) if len(it.choices) > k]
        moved = []
        for i in sub:
            ch = list(items[i].choices)
            g = gold[i]
            ch[k], ch[g] = ch[g], ch[k]
            moved.append(Shuffled(items[i].question, ch))
        probs = score_fn(moved)
        scored += len(moved)
        acc = float((probs.argmax(-1) == k).float().mean()) if moved else 0.0
        by_pos[LETTERS[k]] = {"n": len(moved), "accuracy": acc}
    accs = [v["accuracy"] for v in by_pos.values()]
    return {
        "accuracy_by_position": by_pos,
        "spread": (max(accs) - min(accs)) if accs else 0.0,
        "cost": _cost(k_max, scored, time.perf_counter() - t0),
    }


def rotated(choices: Sequence[str], shift: int) -> list[str]:
    """The choices shifted cyclically: position j shows original choice (j + shift) % n."""
    s = shift % len(choices)
    return list(choices[s:]) + list(choices[:s])


def unrotated(probs: torch.Tensor, n: int, shift: int) -> torch.Tensor:
    """One rotated item's letter probabilities back in its original choice order (its first n letters).

    Position j showed original choice (j + shift) % n, so original choice c sat at position (c - shift) % n.
    """
    back = torch.tensor([(c - shift) % n for c in range(n)])
    return probs[:n][back]


def cyclic_debias(score_fn: ScoreFn, items: Sequence[Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Letter probabilities averaged over every cyclic shift of each item's choices, in the original order.

    Shift s shows choice (j + s) mod n at position j; an item with n choices is scored n times. Returns the
    averaged probabilities [n_items, 10] and the cost (passes, questions scored, seconds).
    """
    t0 = time.perf_counter()
    n_items = len(items)
    total = torch.zeros(n_items, len(LETTERS))
    k_max = max((len(it.choices) for it in items), default=0)
    scored = 0
    for s in range(k_max):
        sub = [i for i, it in enumerate(items) if len(it.choices) > s]
        shown = []
        for i in sub:
            shown.append(Shuffled(items[i].question, rotated(items[i].choices, s)))
        probs = score_fn(shown).float().cpu()
        scored += len(shown)
        for r, i in enumerate(sub):
            n = len(items[i].choices)
            total[i, :n] += unrotated(probs[r], n, s)
    counts = torch.tensor([float(len(it.choices)) for it in items]).clamp_min(1.0)
    return total / counts.unsqueeze(1), _cost(k_max, scored, time.perf_counter() - t0)
