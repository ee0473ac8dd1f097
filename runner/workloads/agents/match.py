"""Matches between teams: players (in-process or over HTTP), the optional key judge, innings, scores and
the report. The tournament recipe wires teams from a job; this module knows nothing of job files."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.workloads.agents.answer import MAX_DEADLINE_S, AnswerAgent, parse_answer_request, rank_choices
from runner.workloads.agents.format_filter import (
    FormatLimits,
    TokenCounter,
    approx_token_count,
    check_answer,
    check_question,
    public_view,
)
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.scoring.prompts import LETTERS


class AnswerPlayer(Protocol):
    def answer(self, questions: list[dict[str, Any]], per_item_s: float) -> list[Any]: ...


class QuestionPlayer(Protocol):
    def write(self, topic: str, limit_s: float) -> Any: ...


class LocalAnswerPlayer:
    def __init__(self, agent: AnswerAgent):
        self.agent = agent

    def answer(self, questions: list[dict[str, Any]], per_item_s: float) -> list[Any]:
        items = [parse_answer_request(q) for q in questions]
        out: list[Any] = []
        for s in range(0, len(items), self.agent.batch_size):
            chunk = items[s : s + self.agent.batch_size]
            # the whole chunk must finish within its items' combined limit (kept with a safety margin)
            out += self.agent.answer_many(chunk, time.monotonic() + 0.8 * per_item_s * len(chunk))
        return out


class LocalQuestionPlayer:
    def __init__(self, agent: QuestionAgent):
        self.agent = agent

    def write(self, topic: str, limit_s: float) -> Any:
        return self.agent.one(topic)


class HttpAnswerPlayer:
    def __init__(self, url: str, token: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers)

    CHUNK = 32  # questions per request: a service's list limit is 256 and its deadline covers a whole request

    def answer(self, questions: list[dict[str, Any]], per_item_s: float) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(questions), self.CHUNK):
            chunk = questions[i : i + self.CHUNK]
            # The rules give each question its own time, so a request of n questions has n times as long.
            deadline = min(per_item_s * len(chunk), MAX_DEADLINE_S)
            body = [dict(q, deadline_s=deadline) for q in chunk]
            r = self.client.post("/v1/answer", json=body, timeout=deadline + 5)
            r.raise_for_status()
            out += list(r.json())
        return out


class HttpQuestionPlayer:
    def __init__(self, url: str, token: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers)

    def write(self, topic: str, limit_s: float) -> Any:
        r = self.client.post("/v1/question", json={"topic": topic, "n": 1}, timeout=limit_s + 1)
        r.raise_for_status()
        return r.json()["questions"][0]


class Judge(Protocol):
    def check(self, questions: list[dict[str, Any]]) -> list[str | None]:
        """Per question: None when its key stands, else why the judge disputes it."""
        ...


JUDGE_DISPUTES = "the judge disputes the key"


class KeyJudge:
    """Answers each question itself; a key it disputes with at least `min_confidence` makes the question invalid."""

    def __init__(self, agent: AnswerAgent, min_confidence: float = 0.5):
        self.agent = agent
        self.min_confidence = min_confidence

    def check(self, questions: list[dict[str, Any]]) -> list[str | None]:
        items = [parse_answer_request(public_view(q)) for q in questions]
        probs, _ = self.agent.probabilities(items)  # no deadline: the judge's time is not a team's
        out: list[str | None] = []
        for q, it, row in zip(questions, items, probs.tolist(), strict=True):
            p = row[: len(it.choices)]
            best = rank_choices(p)[0]
            key = LETTERS.index(q["answer"])
            if best != key and p[best] >= self.min_confidence:
                out.append(f"answers {LETTERS[best]} ({p[best]:.0%}), not the key {q['answer']} ({p[key]:.0%})")
            else:
                out.append(None)
        return out


@dataclass
class TeamPlayers:
    name: str
    answer: AnswerPlayer
    question: QuestionPlayer


@dataclass
class RulesConfig:
    rounds: int = 1
    questions_per_innings: int = 20
    topics: Sequence[str] = ("seating_linear",)
    question_time_s: float = 13.0
    answer_time_s: float = 9.0
    min_valid_fraction: float = 0.5
    limits: FormatLimits = field(default_factory=FormatLimits)
    seed: int = 0
    judge: Judge | None = None


def play_innings(
    q_team: TeamPlayers, a_team: TeamPlayers, rules: RulesConfig, count: TokenCounter, log: Any = print
) -> dict[str, Any]:
    """X's Q-agent writes, Y's A-agent answers; one record per question."""
    records: list[dict[str, Any]] = []
    topics = list(rules.topics)
    for i in range(rules.questions_per_innings):
        topic = topics[i % len(topics)]
        t0 = time.monotonic()
        try:
            q = q_team.question.write(topic, rules.question_time_s)
            reasons = check_question(q, count, rules.limits)
        except Exception as e:  # a crashing or unreachable agent forfeits the question, not the tournament
            q, reasons = None, [f"the question agent failed: {type(e).__name__}: {str(e)[:120]}"]
        took = time.monotonic() - t0
        if not reasons and took > rules.question_time_s:
            reasons = [f"written in {took:.1f} s; the limit is {rules.question_time_s:g} s"]
        records.append({"topic": topic, "valid": not reasons, "reason": reasons[0] if reasons else None,
                        "question": q, "write_s": round(took, 3), "correct": None})
    if rules.judge is not None:
        checked = [r for r in records if r["valid"]]
        try:
            verdicts = rules.judge.check([r["question"] for r in checked]) if checked else []
        except Exception as e:  # the judge's failure is not the writing team's: keys stand as written
            log(f"  the judge failed, keys taken as written: {type(e).__name__}: {str(e)[:200]}")
            verdicts = [None] * len(checked)
        for r, why in zip(checked, verdicts, strict=True):
            if why is not None:
                r["valid"], r["reason"], r["judge"] = False, JUDGE_DISPUTES, why
    valid = [r for r in records if r["valid"]]
    if valid:
        t0 = time.monotonic()
        try:
            answers = a_team.answer.answer([public_view(r["question"]) for r in valid], rules.answer_time_s)
            if len(answers) != len(valid):
                raise ValueError(f"{len(answers)} answers to {len(valid)} questions")
        except Exception as e:
            log(f"  {a_team.name}'s answer agent failed: {type(e).__name__}: {str(e)[:200]}")
            answers = [None] * len(valid)
        per_item = (time.monotonic() - t0) / len(valid)
        for r, a in zip(valid, answers, strict=True):
            a_reasons = check_answer(a, 4, count, rules.limits) if a is not None else ["no answer"]
            if per_item > rules.answer_time_s:
                a_reasons.append(f"answered in {per_item:.1f} s per question; the limit is {rules.answer_time_s:g} s")
            r["answer"] = a
            r["answer_reason"] = a_reasons[0] if a_reasons else None
            r["correct"] = not a_reasons and a["answer"] == r["question"]["answer"]
            r["answer_s"] = round(per_item, 3)
    return {"question_team": q_team.name, "answer_team": a_team.name, "questions": records}


def _pct(num: int, den: int) -> float | None:
    return round(100.0 * num / den, 2) if den else None


def score(innings: Sequence[dict[str, Any]], teams: Sequence[str], min_valid_fraction: float) -> dict[str, Any]:
    """Scoreboard from played innings (pure: the hand-computed example in the tests checks this)."""
    board: dict[str, dict[str, Any]] = {}
    for t in teams:
        board[t] = {"written": 0, "valid": 0, "opponent_wrong": 0, "faced": 0, "correct": 0,
                    "topics": {}, "invalid_reasons": {}}
    for inn in innings:
        qt, at = board[inn["question_team"]], board[inn["answer_team"]]
        for r in inn["questions"]:
            qt["written"] += 1
            tq = qt["topics"].setdefault(r["topic"], {"written": 0, "valid": 0, "opponent_wrong": 0,
                                                      "faced": 0, "correct": 0})
            tq["written"] += 1
            if not r["valid"]:
                key = r["reason"] or "invalid"
                qt["invalid_reasons"][key] = qt["invalid_reasons"].get(key, 0) + 1
                continue
            qt["valid"] += 1
            tq["valid"] += 1
            ta = at["topics"].setdefault(r["topic"], {"written": 0, "valid": 0, "opponent_wrong": 0,
                                                      "faced": 0, "correct": 0})
            at["faced"] += 1
            ta["faced"] += 1
            if r["correct"]:
                at["correct"] += 1
                ta["correct"] += 1
            else:
                qt["opponent_wrong"] += 1
                tq["opponent_wrong"] += 1
    for b in board.values():
        b["answer_score"] = _pct(b["correct"], b["faced"])
        b["question_score"] = _pct(b["opponent_wrong"], b["valid"])
        b["valid_fraction"] = round(b["valid"] / b["written"], 4) if b["written"] else 0.0
        b["disqualified"] = b["valid_fraction"] < min_valid_fraction
        a_raw = b["correct"] / b["faced"] if b["faced"] else 0.0
        q_raw = b["opponent_wrong"] / b["valid"] if b["valid"] else 0.0
        b["score"] = round(100.0 * (a_raw + q_raw) / 2, 2)
        for tq in b["topics"].values():
            tq["answer_score"] = _pct(tq["correct"], tq["faced"])
            tq["question_score"] = _pct(tq["opponent_wrong"], tq["valid"])
    ranking = sorted(teams, key=lambda t: (board[t]["disqualified"], -board[t]["score"], t))
    for i, t in enumerate(ranking):
        board[t]["rank"] = i + 1
    return {"ranking": ranking, "teams": board, "winner": None if board[ranking[0]]["disqualified"] else ranking[0]}


def play(teams: Sequence[TeamPlayers], rules: RulesConfig, count: TokenCounter = approx_token_count,
         log: Any = print) -> dict[str, Any]:
    """Every ordered pair of teams plays one innings per round, in a seeded order."""
    rng = random.Random(rules.seed)
    innings = []
    for rnd in range(rules.rounds):
        pairs = list(itertools.permutations(teams, 2))
        rng.shuffle(pairs)
        for x, y in pairs:
            t0 = time.monotonic()
            inn = play_innings(x, y, rules, count, log)
            inn["round"] = rnd + 1
            innings.append(inn)
            qs = inn["questions"]
            valid = sum(r["valid"] for r in qs)
            correct = sum(bool(r["correct"]) for r in qs)
            log(f"round {rnd + 1}: {x.name} asks, {y.name} answers: {valid}/{len(qs)} valid, "
                f"{correct}/{valid} answered correctly ({time.monotonic() - t0:.1f} s)")
    board = score(innings, [t.name for t in teams], rules.min_valid_fraction)
    board["innings"] = innings
    return board


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def report_md(result: dict[str, Any], title: str) -> str:
    teams = result["teams"]
    lines = [f"# Tournament: {title}", ""]
    w = result["winner"]
    lines += [f"Winner: **{w}**" if w else "No winner: every team is out.", ""]
    judge = (result.get("models") or {}).get("judge")
    if judge:
        lines += [f"Keys checked by a judge model ({judge}): a key it disputes makes the question invalid.", ""]
    lines += ["| rank | team | score | A-score (correct) | Q-score (opponent wrong) | valid questions | status |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for t in result["ranking"]:
        b = teams[t]
        status = "out (< {:.0%} valid)".format(result.get("min_valid_fraction", 0.5)) if b["disqualified"] else "in"
        lines.append(
            f"| {b['rank']} | {t} | {b['score']:.1f} | {_fmt(b['answer_score'])} ({b['correct']}/{b['faced']}) "
            f"| {_fmt(b['question_score'])} ({b['opponent_wrong']}/{b['valid']}) "
            f"| {b['valid']}/{b['written']} | {status} |"
        )
    topics = sorted({tp for b in teams.values() for tp in b["topics"]})
    lines += ["", "## Answer agents by topic (% correct)", "", "| team | " + " | ".join(topics) + " |",
              "|---|" + "---:|" * len(topics)]
    for t in result["ranking"]:
        row = [_fmt(teams[t]["topics"].get(tp, {}).get("answer_score")) for tp in topics]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    lines += ["", "## Question agents by topic (% of valid questions the opponent got wrong; valid/written)", "",
              "| team | " + " | ".join(topics) + " |", "|---|" + "---:|" * len(topics)]
    for t in result["ranking"]:
        cells = []
        for tp in topics:
            d = teams[t]["topics"].get(tp)
            cells.append("-" if not d or not d["written"] else f"{_fmt(d['question_score'])} ({d['valid']}/{d['written']})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    reasons = {t: b["invalid_reasons"] for t, b in teams.items() if b["invalid_reasons"]}
    if reasons:
        lines += ["", "## Why questions were invalid", ""]
        for t, rs in reasons.items():
            for r, n in sorted(rs.items(), key=lambda x: -x[1]):
                lines.append(f"- {t}: {n} x {r}")
    return "\n".join(lines) + "\n"
