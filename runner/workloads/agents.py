"""The two tournament agents: AnswerAgent (single-pass letter scoring under a deadline) and QuestionAgent
(bank / procedural / model-written questions, every one through the format filter before it leaves).
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.workloads import procedural
from runner.workloads.format_filter import (
    FormatLimits,
    TokenCounter,
    approx_token_count,
    check_question,
)
from runner.workloads.packed_attention import enable_packed_scoring
from runner.workloads.prompts import LETTERS, strip_choice_prefix
from runner.workloads.scoring import score_mcq

SOURCES = ("bank", "procedural", "model")


MAX_DEADLINE_S = 120.0  # the longest deadline one answer request may ask for


def rank_choices(p: Sequence[float]) -> list[int]:
    """Choice indices, most probable first; ties go to the earlier letter."""
    return sorted(range(len(p)), key=lambda j: -p[j])  # stable


@dataclass
class AnswerItem:
    """One question to answer: plain choice texts (any 'A) ' prefixes removed)."""

    question: str
    choices: list[str]


def parse_answer_request(d: Any) -> AnswerItem:
    """Validate `{"question", "choices"}`; ValueError with the reason when malformed."""
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object with 'question' and 'choices'")
    q, choices = d.get("question"), d.get("choices")
    if not isinstance(q, str) or not q.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError("'choices' must be a list of strings")
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"'choices' needs 2-{len(LETTERS)} entries, got {len(choices)}")
    plain = [strip_choice_prefix(c) for c in choices]
    if any(not c for c in plain):
        raise ValueError("every choice needs text")
    return AnswerItem(q.strip(), plain)


def _short(text: str, words: int = 12) -> str:
    w = text.split()
    return " ".join(w[:words]) + (" ..." if len(w) > words else "")


class AnswerAgent:
    """Answers MCQs by reading the choice-letter probabilities of one forward pass per question.

    `members` is one (model, tokenizer) pair or several (an ensemble, probabilities averaged). With
    `permutations` > 0 each member also scores cyclic shifts of the choices and the probabilities are mapped
    back and averaged, which cancels a model's preference for a letter. Passes run one after another until
    the deadline would be missed; the answer then uses every pass completed so far.
    """

    def __init__(
        self,
        members: Sequence[tuple[Any, Any]],
        *,
        permutations: int = 0,
        deadline_s: float = 6.0,
        batch_size: int = 32,
        reasoning: bool = True,
    ) -> None:
        if not members:
            raise ValueError("an answer agent needs at least one model")
        self.members = list(members)
        self.permutations = permutations
        self.deadline_s = deadline_s
        self.batch_size = batch_size
        self.reasoning = reasoning
        self._pass_seconds: float | None = None

    @property
    def tokenizer(self) -> Any:
        return self.members[0][1]

    def probabilities(self, items: Sequence[AnswerItem], deadline: float | None = None) -> tuple[torch.Tensor, int]:
        """Averaged letter probabilities [n, 10] and the number of passes they come from (0: none in time)."""
        n = len(items)
        total = torch.zeros(n, len(LETTERS))
        passes = 0
        plan = [(m, s) for s in range(self.permutations + 1) for m in self.members]
        for (model, tok), shift in plan:
            now = time.monotonic()
            if deadline is not None and passes > 0:
                est = self._pass_seconds or 0.0
                if now + est > deadline:
                    break
            if deadline is not None and now >= deadline:
                break
            shifted = [AnswerItem(it.question, it.choices[shift % len(it.choices):] + it.choices[: shift % len(it.choices)])
                       for it in items]
            t0 = time.monotonic()
            probs = score_mcq(model, tok, shifted, batch_size=self.batch_size)
            dt = time.monotonic() - t0
            self._pass_seconds = dt if self._pass_seconds is None else 0.7 * self._pass_seconds + 0.3 * dt
            if shift == 0:
                total += probs.float()
            else:
                for r, it in enumerate(items):
                    k = len(it.choices)
                    s = shift % k
                    # shifted letter j shows original choice (j + s) % k
                    idx = torch.tensor([(j + s) % k for j in range(k)])
                    total[r].index_add_(0, idx, probs[r, :k].float())
            passes += 1
        if passes:
            total /= passes
        return total, passes

    def fallback(self, item: AnswerItem, why: str = "no time to score") -> dict[str, Any]:
        """An answer without the model: the longest choice (a weak but better-than-chance prior)."""
        i = max(range(len(item.choices)), key=lambda j: (len(item.choices[j]), -j))
        return {
            "answer": LETTERS[i],
            "reasoning": f"{why}; answered with the most detailed choice, {LETTERS[i]}.",
            "confidence": round(1.0 / len(item.choices), 4),
        }

    def answer_many(self, items: Sequence[AnswerItem], deadline: float | None = None) -> list[dict[str, Any]]:
        """One answer per item; `deadline` is a time.monotonic() instant (default: now + deadline_s)."""
        if not items:
            return []
        if deadline is None:
            deadline = time.monotonic() + self.deadline_s
        probs, passes = self.probabilities(items, deadline)
        if passes == 0:
            return [self.fallback(it) for it in items]
        out = []
        for row, it in zip(probs.tolist(), items, strict=True):
            p = row[: len(it.choices)]
            order = rank_choices(p)
            best = order[0]
            ans: dict[str, Any] = {"answer": LETTERS[best], "confidence": round(p[best], 4)}
            if self.reasoning:
                text = f"{LETTERS[best]}) {_short(it.choices[best])} is the most likely choice ({p[best]:.0%})"
                if len(order) > 1:
                    text += f"; next is {LETTERS[order[1]]} ({p[order[1]]:.0%})"
                ans["reasoning"] = text + "."
            else:
                ans["reasoning"] = ""
            out.append(ans)
        return out

    def answer(self, question: str, choices: Sequence[str], deadline_s: float | None = None) -> dict[str, Any]:
        item = parse_answer_request({"question": question, "choices": list(choices)})
        limit = self.deadline_s if deadline_s is None else deadline_s
        return self.answer_many([item], time.monotonic() + limit)[0]


# --- questions -----------------------------------------------------------------------------------------


@dataclass
class QuestionStats:
    """What the question agent made and threw away, per source."""

    made: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, source: str, reason: str) -> None:
        self.rejected[source] += 1
        key = re.sub(r"\d+", "N", reason)[:80]
        self.reasons[key] = self.reasons.get(key, 0) + 1


_Q_BLOCK = re.compile(
    r"Question:\s*(?P<q>.+?)\s*\n\s*A\)\s*(?P<a>.+?)\s*\n\s*B\)\s*(?P<b>.+?)\s*\n\s*C\)\s*(?P<c>.+?)\s*\n"
    r"\s*D\)\s*(?P<d>.+?)\s*\n\s*Answer:\s*(?P<ans>[A-D])\b(?:\s*\n\s*Explanation:\s*(?P<e>[^\n]+))?",
    re.S,
)
_WRITER_EXAMPLE = (
    "Topic: {topic}\nQuestion: Five people J, K, L, M and N sit in a row facing north. K sits at the left end. "
    "M sits immediately to the right of K. Who sits second from the left end?\nA) J\nB) M\nC) N\nD) L\n"
    "Answer: B\nExplanation: K is first from the left and M is right next to K.\n\n"
)


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
                if src == "model" and not self._agent_agrees(q):
                    self.stats.reject(src, "the answer agent disagrees with the key")
                    continue
                self.stats.made[src] += 1
                if src == "model":
                    self._model_strikes = 0
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

    @torch.no_grad()
    def _from_model(self, topic: str, deadline: float) -> dict[str, Any] | None:
        assert self.writer is not None
        model, tok = self.writer
        prompt = _WRITER_EXAMPLE.format(topic="seating arrangements") + f"Topic: {topic.replace('_', ' ')}\nQuestion:"
        ids = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
        out = model.generate(
            **ids, max_new_tokens=140, do_sample=True, temperature=0.8, top_p=0.95,
            max_time=max(0.2, deadline - time.monotonic() - 1.5),  # leave time for the key check and a fallback
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        text = "Question:" + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        m = _Q_BLOCK.search(text)
        if not m:
            self.stats.reject("model", "the model's text is not a question in the format")
            return None
        return {
            "topic": topic,
            "question": m.group("q").strip(),
            "choices": [f"{L}) {m.group(L.lower()).strip()}" for L in "ABCD"],
            "answer": m.group("ans"),
            "explanation": (m.group("e") or "").strip() or f"The answer is {m.group('ans')}.",
        }

    def _agent_agrees(self, q: dict[str, Any]) -> bool:
        if self.answer_agent is None:
            return False  # an unchecked model-written key is exactly what the judge invalidates
        a = self.answer_agent.answer(q["question"], q["choices"])
        return bool(a["answer"] == q["answer"])



# --- loading ---------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_adapter(path: Path) -> Path:
    """An adapter directory from an adapter, checkpoint or run directory (a run: its latest checkpoint)."""
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    steps = sorted((path / "checkpoints").glob("step-*/adapter/adapter_config.json"))
    if steps:
        return steps[-1].parent
    raise FileNotFoundError(
        f"adapter {path}: no adapter_config.json there, in {path}/adapter/ or in {path}/checkpoints/step-*/adapter/; "
        "point `adapter` at a run directory, a checkpoint, or an adapter directory"
    )


def load_source(source: Any, device: str = "cpu", log: Any = print) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for an AgentSource: the registry version when it resolves, otherwise
    the job-local model (+ adapter). The model is for inference only: it may take the packed scoring path."""
    model, tok, desc = _load_source(source, device, log)
    enable_packed_scoring(model, device)
    return model, tok, desc


def _load_source(source: Any, device: str, log: Any) -> tuple[Any, Any, str]:
    if source.registry is not None:
        from runner.registry import IntegrityError, RegistryError
        from runner.workloads.artifact import load_artifact

        try:
            model, tok, manifest = load_artifact(source.registry, device)
            return model, tok, f"{manifest.get('name', source.registry)}:v{manifest.get('version', '?')}"
        except IntegrityError:
            raise  # a modified artifact is refused, never silently replaced by another model
        except RegistryError as e:
            if source.model is None:
                raise
            log(f"registry {source.registry} not used ({e}); using the job-local model {source.model.base}")
    if source.model is None:
        raise ValueError("no model: give `model` or `registry`")
    from runner.workloads.modeling import load_adapter, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(source.model, device, log=log)
    desc = str(source.model.base)
    if source.adapter is not None:
        adapter = find_adapter(Path(source.adapter))
        model = load_adapter(model, adapter, trainable=False)
        model.eval()
        desc += f" + {adapter}"
    return model, tok, desc
