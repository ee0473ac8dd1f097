"""The tournament's format checks, held to the starter kit's own filter rules at each limit's boundary.

`kit_question_ok` / `kit_answer_ok` below restate the AMD AI Academy AAIPL starter kit's `filter_questions` /
`filter_answers` rules (4 choices, each a string longer than 2 characters starting with A-D; tokens(question +
answer + choices) - 15 < 130; that + tokens(explanation, or "None") <= 1024; answer under 50 tokens and answer +
reasoning (or "None") under 512; fewer than half valid: out). The filter must agree with them at every token
boundary, and never accept what they reject.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _tiny_lm as tiny
import pytest

from runner.workloads.agents import procedural
from runner.workloads.agents.format_filter import (
    FormatLimits,
    approx_token_count,
    check_answer,
    check_question,
    public_view,
    question_tokens,
    token_counter,
)
from runner.workloads.agents.match import score

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "topic": "blood_relations",
    "question": "P is the father of Q. Q is the sister of R. How is P related to R?",
    "choices": ["A) Uncle", "B) Father", "C) Brother", "D) Grandfather"],
    "answer": "B",
    "explanation": "P is the parent of Q and of Q's sibling R.",
}
Count = Callable[[str], int]


def _tokenizers() -> list[Any]:
    """The tiny tokenizer always; the real smollm2-135m one too when its model directory is built."""
    from transformers import AutoTokenizer

    out = [pytest.param(tiny.tokenizer(), id="tiny")]
    built = sorted((ROOT / ".runner" / "cache" / "smollm2-135m").glob("*/tokenizer.json"))
    if built:
        out.append(pytest.param(AutoTokenizer.from_pretrained(str(built[0].parent)), id="smollm2-135m"))
    return out


TOKENIZERS = _tokenizers()


def kit_question_ok(q: Any, count: Count) -> bool:
    """The starter kit's question rules, restated."""
    if not isinstance(q, dict) or not all(k in q for k in ("topic", "question", "choices", "answer")):
        return False
    ch = q["choices"]
    if not isinstance(ch, list) or len(ch) != 4:
        return False
    if not all(isinstance(c, str) and len(c) > 2 and c[0].upper() in "ABCD" for c in ch):
        return False
    n = count(q["question"]) + count(q["answer"]) + sum(count(c) for c in ch) - 15
    return n < 130 and n + count(q.get("explanation", "None")) <= 1024 and isinstance(q["answer"], str)


def kit_answer_ok(a: Any, count: Count) -> bool:
    """The starter kit's answer rules, restated."""
    if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
        return False
    if len(a["answer"]) == 1 and a["answer"] not in "ABCDabcd":
        return False
    n = count(a["answer"])
    return n < 50 and n + count(a.get("reasoning", "None")) < 512


def bad(**over: object) -> dict[str, object]:
    return {**GOOD, **over}


def pad_to(text: str, target: int, count: Count) -> str:
    """`text` grown with digit runs (one token per digit in these tokenizers) to exactly `target` tokens."""
    while count(text + " " + "7" * 20) <= target:
        text += " " + "7" * 20
    if count(text + " 7") <= target:
        text += " 7"
    while count(text) < target:
        text += "7"
    assert count(text) == target, (count(text), target)
    return text


def test_a_well_formed_question_passes() -> None:
    assert check_question(GOOD) == []
    assert check_question(GOOD, token_counter(tiny.tokenizer())) == []


def test_each_broken_rule_is_named() -> None:
    cases = {
        "missing field(s): answer": {k: v for k, v in GOOD.items() if k != "answer"},
        "missing field(s): topic": {k: v for k, v in GOOD.items() if k != "topic"},
        "unexpected field(s): hint": bad(hint="think"),
        "needs exactly 4 choices, got 3": bad(choices=GOOD["choices"][:3]),  # type: ignore[index]
        "choice 2 must look like 'B) <text>'": bad(choices=["A) a", "b", "C) c", "D) d"]),
        "choices must be distinct": bad(choices=["A) x", "B) y", "C) X", "D) z"]),
        "answer must be one letter of A, B, C, D": bad(answer="E"),
        "explanation has 101 words; at most 100": bad(explanation="w " * 101),
        "explanation must be a string": bad(explanation=3),
        "question is empty": bad(question="  "),
        "choices must be a list of strings": bad(choices="A) a B) b"),
    }
    for expected, q in cases.items():
        reasons = check_question(q)
        assert any(r.startswith(expected) for r in reasons), (expected, reasons)
    assert check_question(["not", "a", "dict"]) == ["a question must be a JSON object, got list"]


def test_the_explanation_is_optional_as_in_the_kit() -> None:
    # "Not having them doesn't disqualify": a missing explanation is counted as the text "None".
    no_expl = {k: v for k, v in GOOD.items() if k != "explanation"}
    assert check_question(no_expl) == [] and kit_question_ok(no_expl, approx_token_count)


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_question_token_limit_is_the_kits_minus_15_under_130(tok: Any) -> None:
    count = token_counter(tok)
    rest = count(GOOD["answer"]) + sum(count(c) for c in GOOD["choices"])
    for raw, ok in ((144, True), (145, False)):  # raw - 15 < 130
        q = bad(question=pad_to("Who is P to R? P is the father of Q.", raw - rest, count))
        assert question_tokens(q, count) == raw - 15
        assert kit_question_ok(q, count) is ok
        reasons = check_question(q, count)
        assert (reasons == []) is ok, reasons
        if not ok:
            assert reasons == [f"question + choices + answer is {raw} tokens (130 after the kit's 15); must be "
                               "under 130 after it"]


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_explanation_tokens_count_with_the_question_up_to_1024(tok: Any) -> None:
    # The kit counts tokens (not characters): (question + answer + choices - 15) + explanation <= 1024.
    count = token_counter(tok)
    n = question_tokens(GOOD, count)
    for total, ok in ((1024, True), (1025, False)):
        q = bad(explanation=pad_to("Because", total - n, count))
        assert len(q["explanation"].split()) <= 100  # type: ignore[union-attr]  # the word rule stays out of it
        assert kit_question_ok(q, count) is ok
        reasons = check_question(q, count)
        assert (reasons == []) is ok, reasons
        if not ok:
            assert reasons[0].startswith("question + choices + answer + explanation is 1025 tokens")


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_answer_and_reasoning_under_512_tokens(tok: Any) -> None:
    count = token_counter(tok)
    for total, ok in ((511, True), (512, False)):
        a = {"answer": "C", "reasoning": pad_to("C fits", total - count("C"), count)}
        assert kit_answer_ok(a, count) is ok
        reasons = check_answer(a, 4, count)
        assert (reasons == []) is ok, reasons
        if not ok:
            assert reasons == ["answer + reasoning is 512 tokens; must be under 512"]
    # a missing reasoning counts as "None", as the kit counts it
    none_counts = {"None": 501, "C": 11}
    assert check_answer({"answer": "C"}, 4, none_counts.__getitem__) == ["answer + reasoning is 512 tokens; must "
                                                                          "be under 512"]
    assert check_answer({"answer": "C", "reasoning": ""}, 4, lambda s: {"": 0}.get(s, 11)) == []


def test_the_answer_alone_must_be_under_50_tokens() -> None:
    # Only reachable with a tokenizer that splits a letter; the rule is the kit's and is checked first.
    for n, ok in ((49, True), (50, False)):
        a = {"answer": "A", "reasoning": "short"}
        count = lambda s, n=n: n if s == "A" else 1  # noqa: E731
        assert kit_answer_ok(a, count) is ok
        assert (check_answer(a, 4, count) == []) is ok
    assert check_answer({"answer": "A"}, 4, lambda s: 50) == ["answer is 50 tokens; must be under 50"]


def test_choices_longer_than_2_chars_starting_with_a_to_d() -> None:
    count = approx_token_count
    for choices in (["A)", "B) x", "C) y", "D) z"],  # 2 characters: the kit rejects it
                    ["A) w", "B) x", "C) y", "E) z"],  # not A-D
                    ["A) w", "B) x", "C) y", 4]):
        q = bad(choices=choices)
        assert not kit_question_ok(q, count) and check_question(q, count)
    assert kit_question_ok(bad(choices=["A) w", "B) x", "C) y", "D) z"]), count)
    assert check_question(bad(choices=["A) w", "B) x", "C) y", "D) z"]), count) == []


def test_everything_the_filter_accepts_the_kit_accepts() -> None:
    # Procedural questions and mutations of them (labels, lengths, keys, fields): the filter is never laxer.
    rng = random.Random(0)
    count = token_counter(tiny.tokenizer())
    mutations: list[Callable[[dict[str, Any]], None]] = [
        lambda q: q.update(choices=[c[3:] for c in q["choices"]]),
        lambda q: q.update(choices=[c.replace(") ", ")", 1) for c in q["choices"]]),
        lambda q: q.update(answer="b"),
        lambda q: q.update(answer="B) x"),
        lambda q: q.pop("explanation"),
        lambda q: q.pop("topic"),
        lambda q: q.update(question=q["question"] + " Hint: count them." * rng.randint(1, 12)),
        lambda q: q.update(explanation=" ".join(["12345678901234567890"] * rng.randint(40, 99))),
        lambda q: q.update(choices=q["choices"][:3]),
        lambda q: None,
    ]
    accepted = 0
    for topic in procedural.TOPICS:
        for p in procedural.generate_many(topic, 20, seed=1):
            q = p.to_tournament()
            rng.choice(mutations)(q)
            if check_question(q, count) == []:
                accepted += 1
                assert kit_question_ok(q, count), q
    assert accepted >= 10


def test_answers() -> None:
    assert check_answer({"answer": "C", "reasoning": "because"}) == []
    assert check_answer({"answer": "C", "reasoning": "x", "confidence": 0.5}) == []
    assert check_answer({"answer": "E", "reasoning": ""})[0].startswith("answer must be one letter of ABCD")
    assert check_answer({"answer": "E"}, n_choices=5) == []
    assert check_answer({"reasoning": "no letter"}) == ["missing field: answer"]
    assert check_answer({"answer": "A", "reasoning": "w " * 101})[0].startswith("reasoning has 101 words")
    assert check_answer("A") == ["an answer must be a JSON object, got str"]


def test_fewer_than_half_valid_is_out() -> None:
    # The kit keeps a team's questions when len(valid) >= 0.5 * len(questions): exactly half stays in.
    def innings(valid: int, written: int) -> dict[str, Any]:
        qs = [{"topic": "t", "valid": i < valid, "reason": None if i < valid else "bad", "correct": False}
              for i in range(written)]
        return {"question_team": "x", "answer_team": "y", "questions": qs}

    assert not score([innings(5, 10)], ["x", "y"], 0.5)["teams"]["x"]["disqualified"]
    assert score([innings(4, 10)], ["x", "y"], 0.5)["teams"]["x"]["disqualified"]
    assert not score([innings(1, 2)], ["x", "y"], 0.5)["teams"]["x"]["disqualified"]


def test_limits_are_configurable() -> None:
    assert check_question(GOOD, limits=FormatLimits(question_tokens=10))
    assert check_question(bad(question="Which of these is right? " + "word " * 120)) != []
    assert check_question(bad(question="Which of these is right? " + "word " * 120), count=lambda s: 1) == []


def test_the_approximate_count_errs_high() -> None:
    text = "Statements: All pens are cups. Some cups are not keys. 12 items."
    assert approx_token_count(text) >= len(text.split())


def test_only_question_and_choices_reach_the_opponent() -> None:
    assert public_view(GOOD) == {"question": GOOD["question"], "choices": GOOD["choices"]}
