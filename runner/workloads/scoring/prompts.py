"""How an MCQ is shown to the model: the one prompt format shared by training, evaluation and the agents."""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEFGHIJ"
_PREFIX = re.compile(r"^\s*\(?([A-J])[\).:]\s+")


def strip_choice_prefix(choice: str) -> str:
    """'B) Paris' -> 'Paris' (tournament choices carry their letter; records do not)."""
    return _PREFIX.sub("", choice, count=1).strip()


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """The question, its lettered choices and 'Answer:'; the model's next token is ' A', ' B', ..."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"an MCQ needs 2-{len(LETTERS)} choices, got {len(choices)}")
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}) {strip_choice_prefix(c)}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def answer_text(letter: str) -> str:
    """The completion trained after the prompt: a space and the letter."""
    return f" {letter}"
