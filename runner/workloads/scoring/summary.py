"""Accuracy with breakdowns, calibration figures, per-question predictions and ensembles of scored members."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from runner.stats import wilson_interval
from runner.workloads.scoring.calibration import (
    brier_score,
    expected_calibration_error,
    nll,
    prediction_shares,
    reliability_bins,
)
from runner.workloads.scoring.prompts import LETTERS


def _breakdown(records: Sequence[Any], correct: torch.Tensor, attr: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[str(getattr(r, attr, "") or "unknown")].append(i)
    return {
        k: {"n": len(ix), "accuracy": float(correct[ix].mean())}
        for k, ix in sorted(groups.items(), key=lambda kv: kv[0])
    }


def summarize(records: Sequence[Any], probs: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Accuracy overall and by topic/source/difficulty, n, ECE, Brier, NLL and mean confidence."""
    gold = torch.tensor([LETTERS.index(r.answer) for r in records], dtype=torch.long)
    pred = probs.argmax(-1)
    correct = (pred == gold).float()
    n = len(records)
    return {
        "n": n,
        "correct": int(correct.sum()),
        "accuracy": float(correct.mean()) if n else 0.0,
        "accuracy_ci95": list(wilson_interval(int(correct.sum()), n)),
        "ece": expected_calibration_error(probs, gold, bins),
        "brier": brier_score(probs, gold),
        "nll": nll(probs, gold),
        "mean_confidence": float(probs.max(-1).values.mean()) if n else 0.0,
        "by_difficulty": _breakdown(records, correct, "difficulty"),
        "by_topic": _breakdown(records, correct, "topic"),
        "by_source": _breakdown(records, correct, "source"),
        "prediction_shares": prediction_shares(probs, gold, [len(r.choices) for r in records]),
        "reliability": reliability_bins(probs, gold, bins),
    }


def predictions(records: Sequence[Any], probs: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Per-question rows: id, gold, prediction, correctness, confidence and the letter probabilities."""
    pred = probs.argmax(-1).tolist()
    rows = []
    for i, r in enumerate(records):
        k = len(r.choices)
        row: dict[str, Any] = {
            "id": r.id,
            "answer": r.answer,
            "pred": LETTERS[pred[i]],
            "correct": LETTERS[pred[i]] == r.answer,
            "confidence": round(float(probs[i, pred[i]]), 6),
            "probs": {LETTERS[j]: round(float(probs[i, j]), 6) for j in range(k)},
            "topic": getattr(r, "topic", None),
            "source": getattr(r, "source", None),
            "difficulty": getattr(r, "difficulty", None),
        }
        for name, t in (extra or {}).items():
            row[name] = LETTERS[int(t[i])] if t.ndim == 1 else {LETTERS[j]: round(float(t[i, j]), 6) for j in range(k)}
        rows.append(row)
    return rows


def ensemble(member_probs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean probabilities, majority-vote prediction); a tied vote goes to the tied letter with the higher mean."""
    stacked = torch.stack([p.float() for p in member_probs])  # [m, n, 10]
    mean = stacked.mean(0)
    votes = torch.zeros_like(mean).scatter_add_(
        1, stacked.argmax(-1).T.contiguous(), torch.ones(mean.shape[0], stacked.shape[0])
    )
    # Among the letters with the most votes, the highest mean probability wins (it is < 1, votes are integers).
    vote = (votes + mean * (votes == votes.max(-1, keepdim=True).values)).argmax(-1)
    return mean, vote


def vote_probs(vote: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Probabilities that put the vote's letter on top: the mean, with the winner's mass swapped in front."""
    out = mean.clone()
    top = mean.argmax(-1)
    rows = torch.arange(mean.shape[0])
    w, t = out[rows, vote].clone(), out[rows, top].clone()
    out[rows, vote], out[rows, top] = t, w
    return out
