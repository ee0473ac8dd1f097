"""The tournament's format checks: what makes a question or an answer invalid, and why."""

from __future__ import annotations

import _tiny_lm as tiny

from runner.workloads.agents.format_filter import (
    FormatLimits,
    approx_token_count,
    check_answer,
    check_question,
    public_view,
    token_counter,
)

GOOD = {
    "topic": "blood_relations",
    "question": "P is the father of Q. Q is the sister of R. How is P related to R?",
    "choices": ["A) Uncle", "B) Father", "C) Brother", "D) Grandfather"],
    "answer": "B",
    "explanation": "P is the parent of Q and of Q's sibling R.",
}


def bad(**over: object) -> dict[str, object]:
    return {**GOOD, **over}


def test_a_well_formed_question_passes() -> None:
    assert check_question(GOOD) == []
    assert check_question(GOOD, token_counter(tiny.tokenizer())) == []


def test_each_broken_rule_is_named() -> None:
    cases = {
        "missing field(s): explanation": {k: v for k, v in GOOD.items() if k != "explanation"},
        "unexpected field(s): hint": bad(hint="think"),
        "needs exactly 4 choices, got 3": bad(choices=GOOD["choices"][:3]),  # type: ignore[index]
        "choice 2 must look like 'B) <text>'": bad(choices=["A) a", "b", "C) c", "D) d"]),
        "choices must be distinct": bad(choices=["A) x", "B) y", "C) X", "D) z"]),
        "answer must be one letter of A, B, C, D": bad(answer="E"),
        "explanation has 101 words; at most 100": bad(explanation="w " * 101),
        "question is empty": bad(question="  "),
        "choices must be a list of strings": bad(choices="A) a B) b"),
    }
    for expected, q in cases.items():
        reasons = check_question(q)
        assert any(r.startswith(expected) for r in reasons), (expected, reasons)
    assert check_question(["not", "a", "dict"]) == ["a question must be a JSON object, got list"]


def test_token_limits_use_the_given_tokenizer() -> None:
    long_q = bad(question="Which of these is right? " + "word " * 120)
    (reason,) = check_question(long_q)
    assert "must be under 130" in reason
    # the same question counted by a tokenizer that sees few tokens passes
    assert check_question(long_q, count=lambda s: 1) == []
    # the limit is configurable (the tournament's rules section sets it)
    assert check_question(GOOD, limits=FormatLimits(question_tokens=10))
    # a real tokenizer's count is what the filter uses
    tok = tiny.tokenizer()
    n = token_counter(tok)(GOOD["question"])  # type: ignore[arg-type]
    assert n == len(tok.encode(GOOD["question"], add_special_tokens=False)) and n > 0


def test_the_approximate_count_errs_high() -> None:
    text = "Statements: All pens are cups. Some cups are not keys. 12 items."
    assert approx_token_count(text) >= len(text.split())


def test_answers() -> None:
    assert check_answer({"answer": "C", "reasoning": "because"}) == []
    assert check_answer({"answer": "C", "reasoning": "x", "confidence": 0.5}) == []
    assert check_answer({"answer": "E", "reasoning": ""})[0].startswith("answer must be one letter of ABCD")
    assert check_answer({"answer": "E"}, n_choices=5) == []
    assert check_answer({"reasoning": "no letter"}) == ["missing field: answer"]
    assert check_answer({"answer": "A", "reasoning": "w " * 101})[0].startswith("reasoning has 101 words")
    assert check_answer({"answer": "A", "reasoning": "w " * 90}, count=lambda s: 600)[0].startswith(
        "answer + reasoning is")


def test_only_question_and_choices_reach_the_opponent() -> None:
    assert public_view(GOOD) == {"question": GOOD["question"], "choices": GOOD["choices"]}
