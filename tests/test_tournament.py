"""Tournament scoring against a hand-computed example, the time limit, a served answer agent, and the
`tournament` job end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _tiny_lm as tiny
import pytest
import torch

from runner.workloads.agents.answer import AnswerAgent, parse_answer_request
from runner.workloads.agents.format_filter import public_view
from runner.workloads.agents.match import (
    HttpAnswerPlayer,
    LocalAnswerPlayer,
    RulesConfig,
    TeamPlayers,
    play,
    report_md,
)
from runner.workloads.serving.app import create_app
from runner.workloads.serving.batcher import MicroBatcher

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def q(topic: str, key: str, n_choices: int = 4, **over: Any) -> dict[str, Any]:
    d = {"topic": topic, "question": f"Which letter is {key}?", "choices": [f"{L}) option {L}" for L in "ABCD"[:n_choices]],
         "answer": key, "explanation": f"It is {key}."}
    d.update(over)
    return d


class Scripted:
    """Writes a fixed list of questions; answers with a fixed function."""

    def __init__(self, questions: list[dict[str, Any]], answer_fn: Any, delay_s: float = 0.0):
        self.questions = list(questions)
        self.answer_fn = answer_fn
        self.delay_s = delay_s

    def write(self, topic: str, limit_s: float) -> Any:
        time.sleep(self.delay_s)
        return self.questions.pop(0)

    def answer(self, questions: list[dict[str, Any]], per_item_s: float) -> list[Any]:
        return [{"answer": self.answer_fn(x), "reasoning": "scripted"} for x in questions]


def test_scores_match_a_hand_computed_example() -> None:
    # red writes 3 valid questions (keys A, B, C) and one with 3 choices (invalid).
    red = Scripted([q("t1", "A"), q("t2", "B"), q("t1", "C"), q("t2", "A", n_choices=3)],
                   answer_fn=lambda x: "D")  # red answers D to everything
    # blue writes 1 valid question (key D) and 3 invalid ones: blue is out (25% < 50% valid).
    blue = Scripted([q("t1", "D"), q("t2", "E"), {k: v for k, v in q("t1", "A").items() if k != "topic"},
                     q("t2", "B", explanation="word " * 101)],
                    answer_fn=lambda x: "A")  # blue answers A to everything
    rules = RulesConfig(questions_per_innings=4, topics=["t1", "t2"])
    res = play([TeamPlayers("red", red, red), TeamPlayers("blue", blue, blue)], rules, log=lambda m: None)
    r, b = res["teams"]["red"], res["teams"]["blue"]
    # By hand: blue faces red's 3 valid questions and gets only the first (A) right: A-score 1/3; red's Q-score 2/3.
    assert (b["correct"], b["faced"], b["answer_score"]) == (1, 3, 33.33)
    assert (r["opponent_wrong"], r["valid"], r["question_score"]) == (2, 3, 66.67)
    # red faces blue's 1 valid question (key D) and answers D: A-score 100%; blue's Q-score 0%.
    assert (r["correct"], r["faced"], r["answer_score"]) == (1, 1, 100.0)
    assert (b["opponent_wrong"], b["valid"], b["question_score"]) == (0, 1, 0.0)
    assert (r["valid_fraction"], b["valid_fraction"]) == (0.75, 0.25)
    assert not r["disqualified"] and b["disqualified"]
    assert r["score"] == 83.33 and b["score"] == 16.67  # (100 + 66.67) / 2 and (33.33 + 0) / 2
    assert res["ranking"] == ["red", "blue"] and res["winner"] == "red"
    # per topic: red's t1 questions (A, C) -> blue wrong once: 50%; t2 (B) -> wrong: 100%, 1 of 2 valid
    assert r["topics"]["t1"]["question_score"] == 50.0
    assert (r["topics"]["t2"]["question_score"], r["topics"]["t2"]["valid"], r["topics"]["t2"]["written"]) == (100.0, 1, 2)
    assert b["topics"]["t1"]["answer_score"] == 50.0 and b["topics"]["t2"]["answer_score"] == 0.0
    assert sum(b["invalid_reasons"].values()) == 3
    md = report_md(res, "example")
    assert "Winner: **red**" in md and "| 1 | red | 83.3 |" in md and "out (< 50% valid)" in md
    # `runner show` of a tournament run reads the same scoreboard.
    from runner.runs import RunStore
    from runner.spec import load_job
    from tests.conftest import run_cli

    run = RunStore().create(load_job(ROOT / "jobs" / "tournament-local.yaml"))
    (run.dir / "tournament.json").write_text(json.dumps(res))
    (run.dir / "report.md").write_text(md)
    run.set_state("running")
    run.set_state("succeeded", exit_code=0)
    show = run_cli("show", run.ref, check=True).stdout
    assert "winner     red" in show, show
    assert "  1. red: score 83.3 (answers 100.0%, questions 66.7%, valid 75%)" in show
    assert "  2. blue: score 16.7 (answers 33.3%, questions 0.0%, valid 25%)  OUT" in show
    assert f"report     {run.dir / 'report.md'}" in show


class ScriptedJudge:
    """Disputes the keys of the questions whose text it is given."""

    def __init__(self, disputed: set[str]):
        self.disputed = disputed
        self.seen = 0

    def check(self, questions: list[dict[str, Any]]) -> list[str | None]:
        self.seen += len(questions)
        return ["answers B (90%), not the key A (5%)" if x["question"] in self.disputed else None for x in questions]


def test_a_key_the_judge_disputes_makes_the_question_invalid() -> None:
    red = Scripted([q("t1", "A", question="Q1"), q("t1", "B", question="Q2"), q("t1", "C", question="Q3"),
                    q("t1", "D", question="Q4", n_choices=3)], answer_fn=lambda x: "A")
    blue = Scripted([q("t1", "A", question="Q5"), q("t1", "B", question="Q6")] * 2, answer_fn=lambda x: "A")
    judge = ScriptedJudge({"Q2", "Q3", "Q6"})
    rules = RulesConfig(questions_per_innings=4, topics=["t1"], judge=judge)
    res = play([TeamPlayers("red", red, red), TeamPlayers("blue", blue, blue)], rules, log=lambda m: None)
    r, b = res["teams"]["red"], res["teams"]["blue"]
    # The judge sees only questions that passed the format filter: red's 3 and blue's 4.
    assert judge.seen == 7
    # red: Q4 fails the format, Q2 and Q3 the judge -> 1 of 4 valid: out. blue: both Q6 -> 2 of 4 valid, not out.
    assert (r["valid"], r["written"], r["disqualified"]) == (1, 4, True)
    assert (b["valid"], b["written"], b["disqualified"]) == (2, 4, False)
    assert r["invalid_reasons"]["the judge disputes the key"] == 2
    # Disputed questions never reach the opponent: blue faces only Q1 (key A, answered A).
    assert (b["faced"], b["correct"]) == (1, 1)
    rec = next(x for i in res["innings"] if i["question_team"] == "red" for x in i["questions"]
               if x["question"]["question"] == "Q2")
    assert rec["valid"] is False and rec["judge"] == "answers B (90%), not the key A (5%)" and rec["correct"] is None
    assert res["winner"] == "blue"


def test_the_model_judge_disputes_only_keys_it_answers_otherwise() -> None:
    from runner.workloads.agents.match import KeyJudge

    agent = AnswerAgent([(tiny.model(), tiny.tokenizer())])
    questions = [q("t1", "A", question=f"Which of these is number {i}?") for i in range(8)]
    probs, _ = agent.probabilities([parse_answer_request(public_view(x)) for x in questions])
    tops = [int(row[:4].argmax()) for row in probs]
    for i, x in enumerate(questions):  # the first half keyed as the judge answers, the rest one letter off
        x["answer"] = "ABCD"[tops[i] if i < 4 else (tops[i] + 1) % 4]
    verdicts = KeyJudge(agent, min_confidence=0.0).check(questions)
    assert verdicts[:4] == [None] * 4
    for i, v in enumerate(verdicts[4:], start=4):
        assert v is not None and v.startswith(f"answers {'ABCD'[tops[i]]} (") and f"not the key {questions[i]['answer']}" in v
    assert KeyJudge(agent, min_confidence=1.0).check(questions) == [None] * 8  # never that sure: keys stand


def test_a_judge_is_declared_in_the_rules() -> None:
    from runner.spec import job_from_data

    base = {"kind": "tournament", "name": "judged", "teams": [
        {"name": "a", "answer": {"model": {"base": "tiny"}}}, {"name": "b", "answer": {"model": {"base": "tiny"}}}]}
    job = job_from_data({**base, "rules": {"judge": {"model": {"base": "tiny"}, "min_confidence": 0.7}}})
    assert job.spec.rules.judge.min_confidence == 0.7 and job.spec.rules.judge.permutations == 1
    with pytest.raises(Exception) as e:
        job_from_data({**base, "rules": {"judge": {"min_confidence": 0.7}}})
    assert "a judge needs `model` or `registry`" in str(e.value)


def test_a_question_over_the_time_limit_is_invalid() -> None:
    slow = Scripted([q("t1", "A"), q("t1", "B")], answer_fn=lambda x: "A", delay_s=0.3)
    fast = Scripted([q("t1", "A"), q("t1", "B")], answer_fn=lambda x: "A")
    rules = RulesConfig(questions_per_innings=2, topics=["t1"], question_time_s=0.2)
    res = play([TeamPlayers("slow", slow, slow), TeamPlayers("fast", fast, fast)], rules, log=lambda m: None)
    assert res["teams"]["slow"]["valid"] == 0 and res["teams"]["slow"]["disqualified"]
    assert "limit is 0.2 s" in next(iter(res["teams"]["slow"]["invalid_reasons"]))
    assert res["teams"]["fast"]["valid"] == 2


def test_a_served_answer_agent_plays_over_http() -> None:
    from test_serve import LiveServer

    agent = AnswerAgent([(tiny.model(), tiny.tokenizer())])
    batcher = MicroBatcher(agent).start()
    writer = Scripted([q("t1", "A"), q("t1", "B"), q("t1", "C")] * 2, answer_fn=lambda x: "A")
    with LiveServer(create_app(agent, batcher)) as srv:
        served = TeamPlayers("served", HttpAnswerPlayer(srv.url), writer)
        local = TeamPlayers("local", LocalAnswerPlayer(agent), writer)
        res = play([served, local], RulesConfig(questions_per_innings=3, topics=["t1"]), log=lambda m: None)
    batcher.stop()
    # both sides run the same model on the same questions, over HTTP or in-process: same answers
    inn = {i["answer_team"]: i for i in res["innings"]}
    got = {t: [r["answer"]["answer"] for r in inn[t]["questions"]] for t in inn}
    assert got["served"] == got["local"] and res["teams"]["served"]["faced"] == 3


def test_a_served_answer_agent_gets_each_questions_time_and_any_number_of_questions() -> None:
    from test_serve import LiveServer

    agent = AnswerAgent([(tiny.model(), tiny.tokenizer())])
    batcher = MicroBatcher(agent).start()
    seen: list[list[float]] = []
    questions = [public_view(q("t1", "ABCD"[i % 4])) for i in range(300)]  # past a request's 256-item limit
    with LiveServer(create_app(agent, batcher)) as srv:
        player = HttpAnswerPlayer(srv.url)
        post = player.client.post

        def spy(url: str, json: Any = None, **kw: Any) -> Any:
            seen.append([item["deadline_s"] for item in json])
            return post(url, json=json, **kw)

        player.client.post = spy  # type: ignore[method-assign]
        answers = player.answer(questions, per_item_s=2.0)
    batcher.stop()
    assert len(answers) == 300 and all(a["answer"] in "ABCD" for a in answers)
    assert [len(d) for d in seen] == [32] * 9 + [12]
    assert seen[0][0] == 64.0 and seen[-1][0] == 24.0  # n questions, n times a question's time


@pytest.mark.slow
def test_tournament_local_job_runs_on_cpu_and_writes_the_scoreboard(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from runner.spec import load_job

    job = load_job(ROOT / "jobs" / "tournament-local.yaml")
    from ruamel.yaml import YAML

    with open(run_dir / "job.yaml", "w") as f:
        YAML().dump(job.data(), f)
    env = dict(os.environ, RUNNER_RUN_DIR=str(run_dir))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "runner.workloads"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    board = json.loads((run_dir / "tournament.json").read_text())
    assert set(board["teams"]) == {"quickstart", "procedural-baseline"}
    for b in board["teams"].values():
        assert b["written"] > 0 and b["answer_score"] is not None
        assert b["valid_fraction"] >= 0.5  # both agents keep to the format
    assert (run_dir / "report.md").read_text().startswith("# Tournament")
    assert took < 300, took


@pytest.mark.slow
def test_a_judged_tournament_job_runs_and_names_its_judge(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(
        "kind: tournament\nname: judged\ndevice: cpu\n"
        "rules: {questions_per_innings: 4, topics: [blood_relations, syllogisms],\n"
        "        judge: {model: {base: tiny}, min_confidence: 0.0, permutations: 0}}\n"
        "teams:\n"
        "  - {name: one, answer: {model: {base: tiny}}, question: {sources: {procedural: 1.0}}}\n"
        "  - {name: two, answer: {model: {base: tiny}}, question: {sources: {procedural: 1.0}}}\n"
    )
    p = subprocess.run([sys.executable, "-m", "runner.workloads"], env=dict(os.environ, RUNNER_RUN_DIR=str(run_dir)),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "judge: " in p.stdout and "overrules a key at >= 0%" in p.stdout
    board = json.loads((run_dir / "tournament.json").read_text())
    assert board["models"]["judge"]
    assert f"Keys checked by a judge model ({board['models']['judge']})" in (run_dir / "report.md").read_text()
    records = [r for i in board["innings"] for r in i["questions"]]
    assert len(records) == 8
    # At confidence 0 the judge disputes every key it does not answer itself; each verdict says so.
    for r in records:
        assert r["valid"] or r["reason"] == "the judge disputes the key" and r["judge"].startswith("answers ")
