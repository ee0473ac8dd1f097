"""The two tournament agents: AnswerAgent (single-pass letter scoring under a deadline) and QuestionAgent
(bank / procedural / model-written questions, every one through the format filter before it leaves).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runner.workloads.agents.reasoning import ReasoningWriter, check_reasoning_mode
from runner.workloads.scoring.calibration import rotated, unrotated
from runner.workloads.scoring.prompts import LETTERS, Prompter, prompter, resolve_prompt, strip_choice_prefix
from runner.workloads.scoring.scorer import score_mcq
from runner.workloads.serving.engines import EngineError

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

    `reasoning`: True, a fixed sentence naming the choice and its probability; False, none; "model", the first
    model explains the chosen answer (`reasoning.py`) in what is left of the deadline, the fixed sentence
    standing in where it cannot. `reasoning_tokens` bounds what the model writes.
    """

    def __init__(
        self,
        members: Sequence[tuple[Any, Any]],
        *,
        permutations: int = 0,
        deadline_s: float = 6.0,
        batch_size: int = 32,
        reasoning: bool | str = True,
        prompt: Any = None,
        reasoning_tokens: int = 64,
    ) -> None:
        if not members:
            raise ValueError("an answer agent needs at least one model")
        self.members = list(members)
        # Each member's prompt style: the job's `prompt` when set, else the one its adapter was trained with.
        self.prompts = [prompter(tok, resolve_prompt(prompt, model)) for model, tok in self.members]
        self.permutations = permutations
        self.deadline_s = deadline_s
        self.batch_size = batch_size
        self.reasoning = check_reasoning_mode(reasoning)
        self.writer = (ReasoningWriter(*self.members[0], max_new_tokens=reasoning_tokens, batch_size=batch_size)
                       if self.reasoning == "model" else None)
        self._pass_seconds: float | None = None
        self.engine_errors = 0  # passes an engine failed (each answered by the passes done or the fallback)
        self.last_engine_error = ""

    @property
    def tokenizer(self) -> Any:
        return self.members[0][1]

    @property
    def prompter(self) -> Prompter:
        """The first member's prompt format (what the service measures prompts with)."""
        return self.prompts[0]

    def probabilities(self, items: Sequence[AnswerItem], deadline: float | None = None) -> tuple[torch.Tensor, int]:
        """Averaged letter probabilities [n, 10] and the number of passes they come from (0: none in time)."""
        n = len(items)
        total = torch.zeros(n, len(LETTERS))
        passes = 0
        plan = [(k, s) for s in range(self.permutations + 1) for k in range(len(self.members))]
        for k, shift in plan:
            model, tok = self.members[k]
            now = time.monotonic()
            if deadline is not None and passes > 0:
                est = self._pass_seconds or 0.0
                if now + est > deadline:
                    break
            if deadline is not None and now >= deadline:
                break
            shifted = [AnswerItem(it.question, rotated(it.choices, shift)) for it in items]
            t0 = time.monotonic()
            try:
                probs = score_mcq(model, tok, shifted, batch_size=self.batch_size, prompt=self.prompts[k])
            except EngineError as e:  # vLLM / llama.cpp failed this pass: answer with the passes done, or fall back
                self.engine_errors += 1
                self.last_engine_error = str(e)
                print(f"warning: {e}", flush=True)
                break
            dt = time.monotonic() - t0
            self._pass_seconds = dt if self._pass_seconds is None else 0.7 * self._pass_seconds + 0.3 * dt
            if shift == 0:  # the unrotated pass: letters already in the original order
                total += probs.float()
            else:
                for r, it in enumerate(items):
                    total[r, : len(it.choices)] += unrotated(probs[r].float(), len(it.choices), shift)
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
        errors = self.engine_errors
        probs, passes = self.probabilities(items, deadline)
        if passes == 0:
            why = "the engine failed to score" if self.engine_errors > errors else "no time to score"
            return [self.fallback(it, why) for it in items]
        out = []
        for row, it in zip(probs.tolist(), items, strict=True):
            p = row[: len(it.choices)]
            order = rank_choices(p)
            best = order[0]
            ans: dict[str, Any] = {"answer": LETTERS[best], "confidence": round(p[best], 4), "reasoning": ""}
            if self.reasoning:
                text = f"{LETTERS[best]}) {_short(it.choices[best])} is the most likely choice ({p[best]:.0%})"
                if len(order) > 1:
                    text += f"; next is {LETTERS[order[1]]} ({p[order[1]]:.0%})"
                ans["reasoning"] = text + "."
            out.append(ans)
        if self.writer is not None:
            written = self.writer.write(items, [a["answer"] for a in out], deadline)
            for a, explained in zip(out, written, strict=True):
                if explained is not None:
                    a["reasoning"] = explained
        return out

    def answer(self, question: str, choices: Sequence[str], deadline_s: float | None = None) -> dict[str, Any]:
        item = parse_answer_request({"question": question, "choices": list(choices)})
        limit = self.deadline_s if deadline_s is None else deadline_s
        return self.answer_many([item], time.monotonic() + limit)[0]


# --- questions -----------------------------------------------------------------------------------------


# --- loading ---------------------------------------------------------------------------------------------


