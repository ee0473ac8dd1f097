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
from runner.workloads.agents.reasoning import contradicts
from runner.workloads.agents.writer import parse_mcq
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


# --- reasoning the model writes --------------------------------------------------------------------------


class Scripted:
    """The tiny model's parameters with a generate() that writes given texts, one per row, as a model would:
    each row ends with EOS unless its budget ran out first, and finished rows are padded."""

    def __init__(self, model: object, tok: object, texts: list[str], finish: bool = True) -> None:
        self.model, self.tok, self.texts, self.finish = model, tok, texts, finish
        self.calls: list[dict[str, object]] = []

    def parameters(self):  # type: ignore[no-untyped-def]
        return self.model.parameters()  # type: ignore[attr-defined]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kw: object) -> torch.Tensor:
        self.calls.append(dict(kw, max_new_tokens=max_new_tokens, rows=input_ids.shape[0]))
        rows = []
        for text in self.texts[: input_ids.shape[0]]:
            ids = self.tok.encode(text, add_special_tokens=False)[:max_new_tokens]  # type: ignore[attr-defined]
            if self.finish and len(ids) < max_new_tokens:
                ids.append(self.tok.eos_token_id)  # type: ignore[attr-defined]
            rows.append(ids)
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])  # type: ignore[attr-defined]
        return torch.cat([input_ids, new], dim=1)


def _items(n: int, seed: int) -> list[AnswerItem]:
    return [AnswerItem(it.question, it.choices) for it in tiny.make_items(n, 4, seed=seed)]


def test_reasoning_modes_and_a_clear_error_for_others(members: list) -> None:
    items = _items(3, seed=21)
    fixed = AnswerAgent(members[:1]).answer_many(items)
    assert all("is the most likely choice" in a["reasoning"] for a in fixed)
    assert all(a["reasoning"] == "" for a in AnswerAgent(members[:1], reasoning=False).answer_many(items))
    with pytest.raises(ValueError, match="use true .* false .* or model"):
        AnswerAgent(members[:1], reasoning="always")


def test_model_reasoning_explains_the_chosen_letter_cut_to_the_limits(members: list) -> None:
    tok = tiny.tokenizer()
    items = _items(5, seed=22)
    letters = [a["answer"] for a in AnswerAgent(members[:1]).answer_many(items)]
    agent = AnswerAgent(members[:1], reasoning="model", reasoning_tokens=400)
    other = [next(x for x in "ABCD" if x != L) for L in letters]
    words = [tiny.WORDS[(7 * i) % len(tiny.WORDS)] for i in range(180)]
    texts = [
        f"{letters[0]}) {items[0].choices[LETTERS.index(letters[0])]} matches what the question asks. It also",
        f"The answer is {other[1]} because it fits.",  # names another letter: not used
        "@@ ## !! 12 34",  # not words
        " ".join(w + ("." if i % 10 == 9 else "") for i, w in enumerate(words)),  # 180 words, a sentence per 10
        "",
    ]
    agent.writer.model = Scripted(members[0][0], tok, texts)  # type: ignore[union-attr]
    out = agent.answer_many(items, deadline=time.monotonic() + 30)
    assert [a["answer"] for a in out] == letters  # reasoning never changes the letter
    assert out[0]["reasoning"] == f"{letters[0]}) {items[0].choices[LETTERS.index(letters[0])]} matches what the " \
                                  "question asks."  # cut at the last full sentence
    for i in (1, 2, 4):
        assert "is the most likely choice" in out[i]["reasoning"]  # the fixed sentence stands in
    long = out[3]["reasoning"]
    assert long.split() == [w + ("." if i % 10 == 9 else "") for i, w in enumerate(words[:100])]
    assert all(check_answer(a, 4, token_counter(tok)) == [] for a in out)
    assert agent.writer.counts == {"written": 2, "no_time": 0, "failed": 0, "unusable": 3}  # type: ignore[union-attr]
    call = agent.writer.model.calls[0]  # type: ignore[union-attr]
    assert call["do_sample"] is False and call["rows"] == 5  # one greedy batch for the whole request
    # a budget that ran out mid-word: the last (maybe cut) word goes and the text still ends a sentence
    agent.writer.model = Scripted(members[0][0], tok, ["because the clues leave only this person in that seat"] * 5,
                                  finish=False)  # type: ignore[union-attr]
    agent.writer.max_new_tokens = 20  # type: ignore[union-attr]
    cut = agent.answer_many(items[:1], deadline=time.monotonic() + 30)[0]["reasoning"]
    assert cut.endswith(".") and cut[:-1] in "because the clues leave only this person in that seat" and cut != "."
    assert 3 <= len(cut.split()) < 10  # cut short of the whole sentence


def test_model_reasoning_falls_back_when_late_or_failing(members: list) -> None:
    items = _items(4, seed=23)
    agent = AnswerAgent(members[:1], reasoning="model")
    writer = agent.writer
    assert writer is not None
    writer.seconds_per_step = 1.0  # as if a step took a second: nothing fits in half a second
    t0 = time.monotonic()
    out = agent.answer_many(items, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 0.5 and writer.counts["no_time"] == 4
    assert all("is the most likely choice" in a["reasoning"] for a in out)

    class Broken:
        def parameters(self):  # type: ignore[no-untyped-def]
            return members[0][0].parameters()

        def generate(self, **kw: object) -> None:
            raise RuntimeError("out of memory")

    writer.seconds_per_step, writer.model = None, Broken()
    out = agent.answer_many(items, deadline=time.monotonic() + 30)
    assert writer.counts["failed"] == 4 and all("most likely" in a["reasoning"] for a in out)


def test_model_reasoning_on_a_real_tiny_model_stays_valid(members: list) -> None:
    # The random tiny model writes noise: whatever it writes, every answer stays valid and on time.
    agent = AnswerAgent(members[:1], reasoning="model", reasoning_tokens=16)
    items = _items(6, seed=24)
    t0 = time.monotonic()
    out = agent.answer_many(items, deadline=time.monotonic() + 20)
    assert time.monotonic() - t0 < 20
    assert all(check_answer(a, 4, token_counter(tiny.tokenizer())) == [] for a in out)
    assert sum(agent.writer.counts.values()) == 6  # type: ignore[union-attr]


# --- questions the model writes ---------------------------------------------------------------------------


def test_parse_mcq_reads_the_layout_leniently() -> None:
    text = ("Topic: blood relations\n**Question:** A is the mother of B. How is B related to A?\nA. Son or daughter\n"
            "B. Aunt\n(C) Uncle\nD) Niece\n**Answer:** A\nExplanation: B is A's child.\nQuestion: another one")
    q = parse_mcq(text, "blood_relations")
    assert q == {"topic": "blood_relations", "question": "A is the mother of B. How is B related to A?",
                 "choices": ["A) Son or daughter", "B) Aunt", "C) Uncle", "D) Niece"], "answer": "A",
                 "explanation": "B is A's child."}
    assert parse_mcq("Who sits left?\nA) J\nB) K\nC) L\nD) M\nThe correct answer is C.", "t")["answer"] == "C"  # type: ignore[index]
    for broken in ("Question: Who?\nA) J\nB) K\nC) L\nAnswer: A",  # three choices
                   "Question: Who?\nA) J\nB) K\nC) L\nD) M\n",  # no key
                   "A) J\nB) K\nC) L\nD) M\nAnswer: B"):  # no question text
        assert parse_mcq(broken, "t") is None


def test_model_source_counts_parse_format_and_key(members: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from runner.workloads.agents import question as question_module
    from runner.workloads.serving.app import create_app
    from runner.workloads.serving.batcher import MicroBatcher

    agent = AnswerAgent(members[:1])
    body = "Question: Which is red?\nA) fire\nB) water\nC) air\nD) earth\n"
    mine = agent.answer("Which is red?", ["fire", "water", "air", "earth"])["answer"]
    other = next(x for x in "ABCD" if x != mine)
    texts = iter([
        "no question here",  # 1st question: not parsed, then
        body + f"Answer: {mine}\nExplanation: " + "w " * 120,  # kept, its explanation cut to 100 words
        body.replace("B) water", "B) fire") + f"Answer: {mine}",  # 2nd: two equal choices fail the filter,
        body + f"Answer: {other}",  # a key the answer agent does not pick is dropped,
        body + f"Answer: {mine}\nExplanation: Fire is red.",  # and this one is kept
    ])
    monkeypatch.setattr(question_module, "write_text", lambda *a, **k: next(texts))
    qa = QuestionAgent(topics=["trivia"], mix={"model": 1.0}, answer_agent=agent, writer=members[0], time_limit_s=60)
    qs = [qa.one("trivia"), qa.one("trivia")]
    assert [len(q["explanation"].split()) for q in qs] == [100, 3] and all(q["answer"] == mine for q in qs)
    assert qa.stats.model == {"generated": 5, "parsed": 4, "format_ok": 3, "key_agrees": 2}
    assert qa.stats.made["model"] == 2 and qa.stats.rejected["model"] == 3
    app = create_app(agent, MicroBatcher(agent), qa)
    with TestClient(app) as client:
        assert client.get("/healthz").json()["questions"]["model"] == qa.stats.model
        text = client.get("/metrics").text
    assert 'qa_model_questions_total{stage="parsed"} 4' in text
    assert 'qa_questions_total{source="model",outcome="made"} 2' in text


def test_reasoning_that_argues_for_another_choice_is_caught() -> None:
    choices = ["Six", "Eight", "Ten", "Four"]
    assert not contradicts("A spider has six legs, like an insect.", "A", choices)
    assert not contradicts("A) Six is right: count them.", "A", choices)
    assert contradicts("A spider has eight legs.", "A", choices)  # only another choice's text
    assert contradicts("The answer is B because spiders have more.", "A", choices)  # another letter claimed
    assert contradicts("A) Eight legs is what spiders have.", "A", choices)  # the letter with another text
    assert contradicts("As D) says, four pairs.", "A", choices)  # another letter's label
    assert not contradicts("Spiders are arachnids with a pair of fangs.", "A", choices)  # names none: no claim
