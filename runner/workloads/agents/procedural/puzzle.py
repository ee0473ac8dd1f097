"""Procedural logic questions with answer keys correct by construction.

Topics: linear and circular seating arrangements, blood relations, syllogisms and alphanumeric series.
Each generator builds the facts first, derives the key by exhaustive search over every arrangement (or
Venn model) consistent with the clues, and only then writes the text; a question whose key is not unique
is never emitted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.workloads.scoring.prompts import LETTERS

SEATING_LINEAR = "seating_linear"
SEATING_CIRCULAR = "seating_circular"
BLOOD_RELATIONS = "blood_relations"
SYLLOGISMS = "syllogisms"
SERIES = "alphanumeric_series"
TOPICS = (SEATING_LINEAR, SEATING_CIRCULAR, BLOOD_RELATIONS, SYLLOGISMS, SERIES)

# Person names are single letters that never collide with the choice letters A-D.
NAME_POOL = "JKLMNPQRSTUVWXYZ"
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth"}


@dataclass
class Puzzle:
    """A generated MCQ: plain choice texts, the index of the right one, and a short explanation."""

    topic: str
    question: str
    choices: list[str]
    answer: int
    explanation: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def to_tournament(self) -> dict[str, Any]:
        """The tournament's question format: lettered choices, a letter key, an explanation."""
        return {
            "topic": self.topic,
            "question": self.question,
            "choices": [f"{LETTERS[i]}) {c}" for i, c in enumerate(self.choices)],
            "answer": self.answer_letter,
            "explanation": self.explanation,
        }


def _choices(rng: random.Random, correct: str, pool: Sequence[str], k: int = 4) -> tuple[list[str], int]:
    others = [p for p in dict.fromkeys(pool) if p != correct]
    picked = rng.sample(others, k - 1) + [correct]
    rng.shuffle(picked)
    return picked, picked.index(correct)


def _names(seq: Sequence[str]) -> str:
    return ", ".join(seq[:-1]) + " and " + seq[-1]


# --- seating arrangements ---------------------------------------------------------------------------


# --- blood relations --------------------------------------------------------------------------------


# --- syllogisms ---------------------------------------------------------------------------------------


# --- alphanumeric series -------------------------------------------------------------------------------


