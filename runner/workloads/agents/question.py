"""QuestionAgent: writes tournament questions from a bank, the procedural generators or a model, filtered by
the format rules."""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.workloads.agents import procedural
from runner.workloads.agents.answer import AnswerAgent, AnswerItem, parse_answer_request
from runner.workloads.agents.format_filter import (
    FormatLimits,
    TokenCounter,
    approx_token_count,
    check_question,
)
from runner.workloads.agents.writer import parse_mcq, write_text
from runner.workloads.scoring.prompts import LETTERS
from runner.workloads.serving.engines import EngineError

SOURCES = ("bank", "procedural", "model")


MODEL_STAGES = ("generated", "parsed", "format_ok", "key_agrees")


@dataclass
class QuestionStats:
    """What the question agent made and threw away, per source, and how far the writer model's texts got:
    `generated`, `parsed` into an MCQ, `format_ok` (passed the format filter too), `key_agrees` (and the answer
    agent picks the stated key: only these leave the agent)."""

    made: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    reasons: dict[str, int] = field(default_factory=dict)
    model: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODEL_STAGES, 0))

    def reject(self, source: str, reason: str) -> None:
        self.rejected[source] += 1
        key = re.sub(r"\d+", "N", reason)[:80]
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"made": dict(self.made), "rejected": dict(self.rejected), "reasons": dict(self.reasons),
                "model": dict(self.model)}

    def prometheus_lines(self) -> list[str]:
        """The counters in Prometheus text format (the service appends them to /metrics)."""
        out = ["# HELP qa_questions_total Questions the question agent wrote (made) or threw away, by source.",
               "# TYPE qa_questions_total counter"]
        for outcome, counts in (("made", self.made), ("rejected", self.rejected)):
            out += [f'qa_questions_total{{source="{s}",outcome="{outcome}"}} {n}' for s, n in counts.items()]
        out += ["# HELP qa_model_questions_total Writer-model texts by how far they got (generated, parsed, "
                "format_ok, key_agrees).", "# TYPE qa_model_questions_total counter"]
        out += [f'qa_model_questions_total{{stage="{k}"}} {n}' for k, n in self.model.items()]
        return out


class QuestionAgent:
    """Writes tournament questions for a topic from a weighted mix of sources.

    `mix` maps a source (`bank`, `procedural`, `model`) to its weight; `per_topic` overrides it per topic.
    A source that cannot serve a topic (no procedural generator, no bank questions of that topic, no writer
    model) is skipped and the next one is tried, so a question always comes out when any source can make one.
    """

    def __init__(
        self,
        *,
        topics: Sequence[str] = procedural.TOPICS,
        mix: dict[str, float] | None = None,
        per_topic: dict[str, dict[str, float]] | None = None,
        bank: Sequence[Any] = (),
        answer_agent: AnswerAgent | None = None,
        writer: tuple[Any, Any] | None = None,
        count_tokens: TokenCounter = approx_token_count,
        limits: FormatLimits = FormatLimits(),
        prefer_hard: bool = True,
        time_limit_s: float = 10.0,
        seed: int = 0,
    ) -> None:
        self.topics = list(topics)
        self.mix = dict(mix or {"procedural": 1.0})
        for src in [*self.mix, *(k for m in (per_topic or {}).values() for k in m)]:
            if src not in SOURCES:
                raise ValueError(f"unknown question source {src!r}; one of: {', '.join(SOURCES)}")
        self.per_topic = {k: dict(v) for k, v in (per_topic or {}).items()}
        self.bank: dict[str, list[Any]] = {}
        for rec in bank:
            self.bank.setdefault(rec.topic, []).append(rec)
        self.answer_agent = answer_agent
        self.writer = writer
        self.count_tokens = count_tokens
        self.limits = limits
        self.prefer_hard = prefer_hard
        self.time_limit_s = time_limit_s
        self.rng = random.Random(seed)
        self.stats = QuestionStats()
        self._bank_order: dict[str, list[Any]] = {}
        self._bank_cursor: dict[str, int] = {}
        self._topic_cycle = itertools.cycle(self.topics) if self.topics else None
        self._asked = 0
        self._model_strikes = 0

    # --- public ---------------------------------------------------------------------------------------

    def generate(self, topic: str | None = None, n: int = 1) -> list[dict[str, Any]]:
        """`n` valid tournament questions; `topic` None cycles through the agent's topics."""
        out = []
        for _ in range(n):
            t = topic
            if t is None:
                if self._topic_cycle is None:
                    raise ValueError("no topic given and the agent has no topics configured")
                t = next(self._topic_cycle)
            out.append(self.one(t))
        return out

    def sources_for(self, topic: str) -> list[tuple[str, float]]:
        """Usable sources for `topic`, heaviest first."""
        weights = self.per_topic.get(topic, self.mix)
        usable = []
        for src, w in weights.items():
            if w <= 0:
                continue
            if src == "procedural" and topic not in procedural.TOPICS:
                continue
            if src == "bank" and not self.bank.get(topic):
                continue
            if src == "model" and self.writer is None:
                continue
            usable.append((src, w))
        return sorted(usable, key=lambda x: -x[1])

    def one(self, topic: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.time_limit_s
        usable = self.sources_for(topic)
        if not usable:
            raise ValueError(
                f"no question source can write topic {topic!r}: procedural covers {', '.join(procedural.TOPICS)}; "
                "`bank` needs questions of that topic; `model` needs a writer model"
            )
        self._asked += 1
        if self._model_strikes >= 2 and self._asked % 5 and len(usable) > 1:
            # The writer keeps failing (format or key check): try it only on every fifth question for now.
            usable = [u for u in usable if u[0] != "model"]
        first = self.rng.choices([s for s, _ in usable], weights=[w for _, w in usable])[0]
        order = [first] + [s for s, _ in usable if s != first]
        for src in order:
            # Model writing is the slow source: leave it once the time is mostly spent. Procedural
            # puzzles vary in length: a model with a wordy tokenizer needs a few draws to fit.
            tries = 3 if src == "model" else 50
            for _ in range(tries):
                if src == "model" and time.monotonic() > deadline - 1.5:
                    break
                q = self._make(src, topic, deadline)
                if q is None:
                    if src == "model":
                        continue  # unparseable text: counted in stats, try again
                    break
                reasons = check_question(q, self.count_tokens, self.limits)
                if reasons:
                    self.stats.reject(src, reasons[0])
                    continue
                if src == "model":
                    self.stats.model["format_ok"] += 1
                    if not self._agent_agrees(q):
                        self.stats.reject(src, "the answer agent disagrees with the key")
                        continue
                    self.stats.model["key_agrees"] += 1
                    self._model_strikes = 0
                self.stats.made[src] += 1
                return q
            if src == "model":
                self._model_strikes += 1
        raise RuntimeError(f"could not write a valid question for topic {topic!r} (tried {', '.join(order)})")

    # --- sources --------------------------------------------------------------------------------------

    def _make(self, src: str, topic: str, deadline: float) -> dict[str, Any] | None:
        if src == "procedural":
            q = procedural.generate(topic, self.rng).to_tournament()
            return q
        if src == "bank":
            return self._from_bank(topic)
        return self._from_model(topic, deadline)

    def _ordered_bank(self, topic: str) -> list[Any]:
        if topic not in self._bank_order:
            recs = [r for r in self.bank.get(topic, []) if len(r.choices) >= 4]
            self.rng.shuffle(recs)
            if self.prefer_hard and self.answer_agent is not None and recs:
                items = [AnswerItem(r.question, list(r.choices)) for r in recs]
                probs, passes = self.answer_agent.probabilities(items)
                if passes:
                    p_right = [float(probs[i, LETTERS.index(r.answer)]) for i, r in enumerate(recs)]
                    recs = [r for _, r in sorted(zip(p_right, recs, strict=True), key=lambda x: x[0])]
            self._bank_order[topic] = recs
            self._bank_cursor[topic] = 0
        return self._bank_order[topic]

    def _from_bank(self, topic: str) -> dict[str, Any] | None:
        recs = self._ordered_bank(topic)
        if not recs:
            return None
        i = self._bank_cursor[topic]
        self._bank_cursor[topic] = i + 1
        rec = recs[i % len(recs)]
        right = LETTERS.index(rec.answer)
        wrong = [j for j in range(len(rec.choices)) if j != right]
        keep = self.rng.sample(wrong, 3) + [right]
        self.rng.shuffle(keep)
        choices = [rec.choices[j] for j in keep]
        letter = LETTERS[keep.index(right)]
        expl = rec.explanation or f"The correct answer is {letter}) {choices[keep.index(right)]}."
        words = expl.split()
        if len(words) > self.limits.explanation_words:
            expl = " ".join(words[: self.limits.explanation_words])
        return {
            "topic": topic,
            "question": rec.question,
            "choices": [f"{LETTERS[k]}) {c}" for k, c in enumerate(choices)],
            "answer": letter,
            "explanation": expl,
        }

    def _from_model(self, topic: str, deadline: float) -> dict[str, Any] | None:
        assert self.writer is not None
        model, tok = self.writer
        # leave time for the key check and a fallback source
        try:
            text = write_text(model, tok, topic, self.rng, deadline - 1.5)
        except EngineError as e:  # an engine that failed this request: another source writes the question
            self.stats.reject("model", f"the engine failed: {e}"[:80])
            return None
        self.stats.model["generated"] += 1
        q = parse_mcq(text, topic, self.limits.explanation_words)
        if q is None:
            self.stats.reject("model", "the model's text is not a question in the format")
            return None
        self.stats.model["parsed"] += 1
        return q

    def _agent_agrees(self, q: dict[str, Any]) -> bool:
        """The own answer agent's letter (scoring only: no reasoning is written) is the stated key."""
        if self.answer_agent is None:
            return False  # an unchecked model-written key is exactly what the judge invalidates
        item = parse_answer_request({"question": q["question"], "choices": q["choices"]})
        probs, passes = self.answer_agent.probabilities([item], time.monotonic() + self.answer_agent.deadline_s)
        if not passes:
            return False
        return LETTERS[int(probs[0, : len(item.choices)].argmax())] == q["answer"]
