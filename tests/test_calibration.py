"""ECE, Brier, reliability bins, letter-prior bias and cyclic debiasing on constructed examples."""

from __future__ import annotations

import pytest
import torch

from runner.workloads.scoring.calibration import (
    Shuffled,
    brier_score,
    cyclic_debias,
    expected_calibration_error,
    letter_bias,
    nll,
    prediction_shares,
    reliability_bins,
)


def two_choice(conf: float, n: int, n_correct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n questions predicted 'A' with confidence `conf`; the first n_correct have gold 'A', the rest 'B'."""
    probs = torch.zeros(n, 10)
    probs[:, 0], probs[:, 1] = conf, 1 - conf
    gold = torch.tensor([0] * n_correct + [1] * (n - n_correct))
    return probs, gold


def test_ece_zero_when_confidence_matches_accuracy():
    probs, gold = two_choice(0.8, 10, 8)
    assert expected_calibration_error(probs, gold) == pytest.approx(0.0, abs=1e-6)


def test_ece_overconfident():
    probs, gold = two_choice(0.9, 10, 5)
    assert expected_calibration_error(probs, gold) == pytest.approx(0.4, abs=1e-6)


def test_ece_two_bins_weighted_by_count():
    p1, g1 = two_choice(0.95, 4, 4)  # |1.0 - 0.95| = 0.05 on 4 of 10
    p2, g2 = two_choice(0.6, 6, 3)  # |0.5 - 0.6| = 0.10 on 6 of 10
    probs, gold = torch.cat([p1, p2]), torch.cat([g1, g2])
    assert expected_calibration_error(probs, gold, bins=10) == pytest.approx(0.4 * 0.05 + 0.6 * 0.1, abs=1e-6)
    bins = reliability_bins(probs, gold, bins=10)
    assert [(b["n"], round(b["accuracy"], 3)) for b in bins] == [(6, 0.5), (4, 1.0)]
    assert bins[0]["lo"] == pytest.approx(0.5) and bins[0]["hi"] == pytest.approx(0.6)


def test_brier_and_nll():
    probs = torch.zeros(3, 10)
    probs[0, 0] = 1.0  # right and sure: 0
    probs[1, :2] = 0.5  # undecided: 0.25 + 0.25
    probs[2, 1] = 1.0  # wrong and sure: 1 + 1
    gold = torch.tensor([0, 0, 0])
    assert brier_score(probs, gold) == pytest.approx((0 + 0.5 + 2) / 3)
    assert nll(probs[:2], gold[:2]) == pytest.approx((0 + torch.log(torch.tensor(2.0)).item()) / 2, abs=1e-6)


def test_prediction_shares():
    probs, gold = two_choice(0.7, 4, 1)
    shares = prediction_shares(probs, gold, [2] * 4)
    assert shares == {"A": {"predicted": 1.0, "gold": 0.25}, "B": {"predicted": 0.0, "gold": 0.75}}


def _items(n: int = 6, k: int = 4) -> tuple[list[Shuffled], list[int]]:
    items = [Shuffled(f"q{i}", [f"choice {i}-{j}" + "x" * ((i * 7 + j * 3) % 5) for j in range(k)]) for i in range(n)]
    gold = [(i * 5) % k for i in range(n)]
    return items, gold


def content_scorer(position_bias: float = 0.0):
    """Scores a choice by its text (length), plus `position_bias` times (last position - position)."""

    def score(items):
        out = torch.zeros(len(items), 10)
        for r, it in enumerate(items):
            n = len(it.choices)
            logits = torch.tensor([len(c) + position_bias * (n - 1 - j) for j, c in enumerate(it.choices)], dtype=torch.float)
            out[r, :n] = logits.softmax(-1)
        return out

    return score


def test_letter_bias_of_a_model_that_always_says_a():
    items, gold = _items()
    always_a = content_scorer(position_bias=100.0)
    res = letter_bias(always_a, items, gold)
    accs = {k: v["accuracy"] for k, v in res["accuracy_by_position"].items()}
    assert accs == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    assert res["spread"] == 1.0
    assert res["cost"]["passes"] == 4 and res["cost"]["questions_scored"] == 24


def test_cyclic_debias_removes_position_preference():
    items, _ = _items(k=4)
    biased = content_scorer(position_bias=1.5)
    debiased, cost = cyclic_debias(biased, items)
    assert cost["passes"] == 4 and cost["questions_scored"] == 24
    torch.testing.assert_close(debiased.sum(-1), torch.ones(len(items)))
    # Showing the choices in another order gives the same debiased probabilities, per choice.
    rotated = [Shuffled(it.question, it.choices[1:] + it.choices[:1]) for it in items]
    again, _ = cyclic_debias(biased, rotated)
    torch.testing.assert_close(again[:, :4], debiased[:, [1, 2, 3, 0]])
    # ...which the plain scorer does not.
    plain = biased(items)
    plain_rot = biased(rotated)
    assert not torch.allclose(plain_rot[:, :4], plain[:, [1, 2, 3, 0]], atol=1e-3)


def test_cyclic_debias_keeps_an_unbiased_scorer_and_mixed_choice_counts():
    items = [Shuffled("q", ["a", "bbb", "cc"]), Shuffled("r", ["dddd", "e"]), Shuffled("s", list("abcde"))]
    fair = content_scorer(0.0)
    debiased, cost = cyclic_debias(fair, items)
    torch.testing.assert_close(debiased, fair(items))
    assert cost["passes"] == 5 and cost["questions_scored"] == 3 + 2 + 5
