"""AnswerAgent and QuestionAgent on a tiny real model, and the starter-kit file commands."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import _tiny_lm as tiny
import pytest
import torch

from runner.workloads.agents.answer import AnswerAgent, AnswerItem, parse_answer_request
from runner.workloads.agents.format_filter import check_answer, check_question, token_counter
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.data.records import MCQ
from runner.workloads.scoring.prompts import LETTERS
from runner.workloads.scoring.scorer import score_mcq

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def members() -> list[tuple[object, object]]:
    return [(tiny.model(seed=0), tiny.tokenizer()), (tiny.model(seed=1), tiny.tokenizer())]


def test_answers_are_always_a_valid_letter_for_2_to_10_choices(members: list) -> None:
    agent = AnswerAgent(members[:1])
    rng = random.Random(0)
    items = tiny.make_items(60, list(range(2, 11)), seed=3)
    answers = agent.answer_many([AnswerItem(it.question, it.choices) for it in items])
    for it, a in zip(items, answers, strict=True):
        assert a["answer"] in LETTERS[: len(it.choices)]
        assert 1 / len(it.choices) - 1e-6 <= a["confidence"] <= 1.0
        assert check_answer(a, len(it.choices)) == []
    it = items[rng.randrange(60)]
    prefixed = [f"{LETTERS[i]}) {c}" for i, c in enumerate(it.choices)]
    assert agent.answer(it.question, prefixed) == agent.answer(it.question, it.choices)


def test_malformed_questions_are_refused_with_the_reason() -> None:
    for bad, why in [({"question": "q", "choices": ["one"]}, "2-10"), ({"question": "", "choices": ["a", "b"]}, "question"),
                     ({"question": "q", "choices": ["A) ", "b"]}, "text"), ("text", "JSON object")]:
        with pytest.raises(ValueError, match=why):
            parse_answer_request(bad)


def test_permutation_debiasing_makes_the_answer_independent_of_choice_order(members: list) -> None:
    # Averaged over every cyclic shift, a choice's probability no longer depends on which letter it sits at.
    agent = AnswerAgent(members[:1], permutations=3)
    it = tiny.make_items(1, 4, seed=11)[0]
    p1, n1 = agent.probabilities([AnswerItem(it.question, it.choices)])
    rot = it.choices[1:] + it.choices[:1]
    p2, n2 = agent.probabilities([AnswerItem(it.question, rot)])
    assert n1 == n2 == 4
    assert torch.allclose(p1[0, [1, 2, 3, 0]], p2[0, :4], atol=1e-5)
    # without debiasing the model's letter preference shows
    plain = AnswerAgent(members[:1])
    q1, _ = plain.probabilities([AnswerItem(it.question, it.choices)])
    q2, _ = plain.probabilities([AnswerItem(it.question, rot)])
    assert not torch.allclose(q1[0, [1, 2, 3, 0]], q2[0, :4], atol=1e-3)


def test_ensemble_averages_its_members(members: list) -> None:
    items = [AnswerItem(it.question, it.choices) for it in tiny.make_items(5, 4, seed=5)]
    both, n = AnswerAgent(members).probabilities(items)
    a = score_mcq(*members[0], items)
    b = score_mcq(*members[1], items)
    assert n == 2 and torch.allclose(both, (a + b) / 2, atol=1e-5)


def test_deadline_answers_with_what_it_has(members: list) -> None:
    agent = AnswerAgent(members, permutations=9)
    items = [AnswerItem(it.question, it.choices) for it in tiny.make_items(8, 4, seed=6)]
    # already late: no pass at all, the fallback (longest choice), still a valid letter
    late = agent.answer_many(items, deadline=time.monotonic() - 1)
    for it, a in zip(items, late, strict=True):
        longest = max(range(4), key=lambda j: (len(it.choices[j]), -j))
        assert a["answer"] == LETTERS[longest] and "no time" in a["reasoning"]
    # a deadline that fits a few of the 20 passes: stops early with a real answer
    agent.probabilities(items)  # learn how long a pass takes
    t0 = time.monotonic()
    _, passes = agent.probabilities(items, deadline=time.monotonic() + 3 * (agent._pass_seconds or 0.01))
    assert 1 <= passes < 20
    assert time.monotonic() - t0 < 10 * (agent._pass_seconds or 0.01) + 0.5


def test_question_agent_mixes_sources_and_filters_every_question(members: list) -> None:
    tok = tiny.tokenizer()
    bank = [MCQ(id=f"b{i}", question=it.question, choices=it.choices, answer=it.answer, topic="trivia")
            for i, it in enumerate(tiny.make_items(12, [4, 5], seed=9))]
    agent = AnswerAgent(members[:1])
    qa = QuestionAgent(topics=["trivia", "blood_relations"], mix={"bank": 1.0, "procedural": 1.0}, bank=bank,
                       answer_agent=agent, count_tokens=token_counter(tok), seed=1)
    qs = qa.generate(None, 10)
    assert [q["topic"] for q in qs] == ["trivia", "blood_relations"] * 5
    for q in qs:
        assert check_question(q, token_counter(tok)) == []
    # bank questions come hardest-first for the own answer agent
    probs, _ = agent.probabilities([AnswerItem(r.question, r.choices) for r in bank])
    hardest = min(bank, key=lambda r: float(probs[bank.index(r), LETTERS.index(r.answer)]))
    assert qa._ordered_bank("trivia")[0] is hardest
    with pytest.raises(ValueError, match="no question source can write topic 'chess'"):
        qa.one("chess")


def test_model_written_questions_survive_only_when_the_answer_agent_agrees(members: list,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    agent = AnswerAgent(members[:1])
    base = {"topic": "trivia", "question": "Which is red?", "choices": ["A) fire", "B) water", "C) air", "D) earth"],
            "explanation": "Fire is red."}
    mine = agent.answer(base["question"], base["choices"])["answer"]
    other = next(L for L in "ABCD" if L != mine)
    qa = QuestionAgent(topics=["trivia"], mix={"model": 1.0}, answer_agent=agent, writer=members[0])
    monkeypatch.setattr(qa, "_from_model", lambda topic, deadline: dict(base, answer=other))
    with pytest.raises(RuntimeError, match="could not write a valid question"):
        qa.one("trivia")
    assert qa.stats.rejected["model"] == 3 and qa.stats.made["model"] == 0
    monkeypatch.setattr(qa, "_from_model", lambda topic, deadline: dict(base, answer=mine))
    assert qa.one("trivia")["answer"] == mine and qa.stats.made["model"] == 1


def test_unparseable_model_text_falls_back_to_procedural(members: list) -> None:
    # A random tiny model writes gibberish: every attempt is rejected and the procedural source answers.
    qa = QuestionAgent(topics=["syllogisms"], mix={"model": 1.0, "procedural": 0.1}, answer_agent=AnswerAgent(members[:1]),
                       writer=members[0], time_limit_s=5)
    q = qa.one("syllogisms")
    assert check_question(q) == [] and qa.stats.made["procedural"] == 1 and qa.stats.rejected["model"] >= 1


def test_starter_kit_file_commands(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny.model().save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    qfile, afile = tmp_path / "q.json", tmp_path / "a.json"
    p = subprocess.run([sys.executable, "-m", "agents.question_agent", "--num_questions", "6", "--no_model",
                        "--output_file", str(qfile)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    qs = json.loads(qfile.read_text())
    assert len(qs) == 6 and all(check_question(q) == [] for q in qs)
    p = subprocess.run([sys.executable, "-m", "agents.answer_agent", "--input_file", str(qfile), "--output_file",
                        str(afile), "--model", str(model_dir), "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    answers = json.loads(afile.read_text())
    assert len(answers) == 6 and all(check_answer(a) == [] for a in answers)
    p = subprocess.run([sys.executable, "-m", "agents.answer_agent", "--input_file", str(tmp_path / "none.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {tmp_path / 'none.json'}: no such file"
