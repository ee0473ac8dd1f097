"""The tournament's format checks for questions and answers, with token limits counted by a real tokenizer.

`check_question` / `check_answer` return the list of reasons an item is invalid (empty = valid), so the
question agent can drop an item before it leaves, and the tournament can say why it was rejected.

The token rules are the starter kit's own (`filter_questions` / `filter_answers` of the AMD AI Academy
AAIPL kit), counted the way it counts them (the tokenizer's `encode` without special tokens):

- question: tokens(question) + tokens(answer) + sum of tokens(choice), minus 15, under 130; that figure plus
  tokens(explanation) at most 1024 (a missing explanation counts as the text `None`, as the kit does);
- answer: tokens(answer) under 50, and tokens(answer) + tokens(reasoning) under 512 (missing reasoning: `None`);
- four choices, each a string longer than 2 characters starting with A-D; `topic`, `question`, `choices` and
  `answer` present; a team with fewer than half of its questions valid is out (`match.score`).

On top of the kit's rules the filter holds questions to what the kit's format section asks for and its
closed judge enforces: choices labelled `A) ` to `D) ` in order and distinct, the key one of those letters,
explanation and reasoning within 100 words, no fields beyond the format's. Everything this filter accepts, the
kit's filter accepts too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.workloads.scoring.prompts import LETTERS

QUESTION_FIELDS = ("topic", "question", "choices", "answer", "explanation")
REQUIRED_QUESTION_FIELDS = ("topic", "question", "choices", "answer")
ANSWER_FIELDS = ("answer", "reasoning")
_CHOICE = re.compile(r"^([A-J])\) \S")
_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")
MISSING_TEXT = "None"  # what the kit counts for a missing explanation or reasoning

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class FormatLimits:
    """The competition's limits (the starter kit's filters; see the module docstring)."""

    n_choices: int = 4
    question_tokens: int = 130  # question + choices + answer - question_token_slack, strictly under
    question_token_slack: int = 15  # the kit subtracts 15 from the question's count before comparing
    explanation_tokens: int = 1024  # the question's (slackened) count + explanation, at most
    answer_letter_tokens: int = 50  # the answer field alone, strictly under
    answer_tokens: int = 512  # answer + reasoning, strictly under
    explanation_words: int = 100
    reasoning_words: int = 100


def approx_token_count(text: str) -> int:
    """A tokenizer-free count that errs high: words split every 4 letters, each digit and symbol one token."""
    n = 0
    for piece in _PIECE.findall(text):
        n += math.ceil(len(piece) / 4) if piece[0].isalpha() else 1
    return n


def token_counter(tokenizer: Any | None) -> TokenCounter:
    """Count tokens with the serving model's tokenizer (no special tokens); the approximation without one."""
    if tokenizer is None:
        return approx_token_count

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def word_count(text: str) -> int:
    return len(text.split())


def question_tokens(q: dict[str, Any], count: TokenCounter, limits: FormatLimits = FormatLimits()) -> int:
    """The kit's question length: question + answer + every choice, less its slack of 15."""
    raw = count(q["question"]) + count(q["answer"]) + sum(count(c) for c in q["choices"])
    return raw - limits.question_token_slack


def check_question(q: Any, count: TokenCounter = approx_token_count, limits: FormatLimits = FormatLimits()) -> list[str]:
    """Reasons `q` is not a valid tournament question; [] when it is."""
    if not isinstance(q, dict):
        return [f"a question must be a JSON object, got {type(q).__name__}"]
    reasons = []
    missing = [f for f in REQUIRED_QUESTION_FIELDS if f not in q]
    extra = sorted(set(q) - set(QUESTION_FIELDS))
    if missing:
        reasons.append(f"missing field(s): {', '.join(missing)}")
    if extra:
        reasons.append(f"unexpected field(s): {', '.join(extra)}")
    for f in QUESTION_FIELDS:
        if f in q and not isinstance(q[f], str) and f != "choices":
            reasons.append(f"{f} must be a string")
    if isinstance(q.get("question"), str) and not q["question"].strip():
        reasons.append("question is empty")
    choices = q.get("choices")
    if "choices" in q:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            reasons.append("choices must be a list of strings")
        elif len(choices) != limits.n_choices:
            reasons.append(f"needs exactly {limits.n_choices} choices, got {len(choices)}")
        else:
            for i, c in enumerate(choices):
                if not c.startswith(f"{LETTERS[i]}) ") or not _CHOICE.match(c):
                    reasons.append(f"choice {i + 1} must look like '{LETTERS[i]}) <text>', got {c[:30]!r}")
            texts = [c[3:].strip().lower() for c in choices]
            if len(set(texts)) != len(texts):
                reasons.append("choices must be distinct")
    answer = q.get("answer")
    if isinstance(answer, str) and answer not in LETTERS[: limits.n_choices]:
        reasons.append(f"answer must be one letter of {', '.join(LETTERS[: limits.n_choices])}, got {answer[:10]!r}")
    expl = q.get("explanation", MISSING_TEXT)
    if isinstance(expl, str) and word_count(expl) > limits.explanation_words:
        reasons.append(f"explanation has {word_count(expl)} words; at most {limits.explanation_words}")
    if not reasons:
        n = question_tokens(q, count, limits)
        if n >= limits.question_tokens:
            reasons.append(f"question + choices + answer is {n + limits.question_token_slack} tokens "
                           f"({n} after the kit's {limits.question_token_slack}); must be under "
                           f"{limits.question_tokens} after it")
        else:
            total = n + count(expl)
            if total > limits.explanation_tokens:
                reasons.append(f"question + choices + answer + explanation is {total} tokens (after the kit's "
                               f"{limits.question_token_slack}); at most {limits.explanation_tokens}")
    return reasons


def check_answer(
    a: Any, n_choices: int = 4, count: TokenCounter = approx_token_count, limits: FormatLimits = FormatLimits()
) -> list[str]:
    """Reasons `a` is not a valid tournament answer to a question with `n_choices` choices; [] when it is."""
    if not isinstance(a, dict):
        return [f"an answer must be a JSON object, got {type(a).__name__}"]
    reasons = []
    if "answer" not in a:
        reasons.append("missing field: answer")
    extra = sorted(set(a) - {*ANSWER_FIELDS, "confidence"})
    if extra:
        reasons.append(f"unexpected field(s): {', '.join(extra)}")
    letter = a.get("answer")
    if "answer" in a and (not isinstance(letter, str) or letter not in LETTERS[:n_choices]):
        reasons.append(f"answer must be one letter of {LETTERS[:n_choices]}, got {str(letter)[:10]!r}")
    reasoning = a.get("reasoning", MISSING_TEXT)
    if not isinstance(reasoning, str):
        reasons.append("reasoning must be a string")
        reasoning = ""
    if word_count(reasoning) > limits.reasoning_words:
        reasons.append(f"reasoning has {word_count(reasoning)} words; at most {limits.reasoning_words}")
    if not reasons and isinstance(letter, str):
        n = count(letter)
        if n >= limits.answer_letter_tokens:
            reasons.append(f"answer is {n} tokens; must be under {limits.answer_letter_tokens}")
        else:
            n += count(reasoning)
            if n >= limits.answer_tokens:
                reasons.append(f"answer + reasoning is {n} tokens; must be under {limits.answer_tokens}")
    return reasons


def public_view(q: dict[str, Any]) -> dict[str, Any]:
    """What reaches the opponent: only the question and its choices."""
    return {"question": q["question"], "choices": list(q["choices"])}
