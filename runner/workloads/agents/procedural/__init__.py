"""Procedural logic questions with answer keys correct by construction: one generator per topic.

Topics: linear and circular seating arrangements, blood relations, syllogisms and alphanumeric series.
Each generator builds the facts first, derives the key by exhaustive search over every arrangement (or
Venn model) consistent with the clues, and only then writes the text; a question whose key is not unique
is never emitted."""

from __future__ import annotations

import random
from collections.abc import Callable

from runner.workloads.agents.procedural.logic import blood_relation, series, syllogism
from runner.workloads.agents.procedural.puzzle import (
    BLOOD_RELATIONS,
    SEATING_CIRCULAR,
    SEATING_LINEAR,
    SERIES,
    SYLLOGISMS,
    TOPICS,
    Puzzle,
)
from runner.workloads.agents.procedural.seating import seating_circular, seating_linear

__all__ = ["BLOOD_RELATIONS", "SEATING_CIRCULAR", "SEATING_LINEAR", "SERIES", "SYLLOGISMS", "TOPICS", "Puzzle",
           "generate", "generate_many"]

GENERATORS: dict[str, Callable[[random.Random], Puzzle]] = {
    SEATING_LINEAR: seating_linear,
    SEATING_CIRCULAR: seating_circular,
    BLOOD_RELATIONS: blood_relation,
    SYLLOGISMS: syllogism,
    SERIES: series,
}


def generate(topic: str, rng: random.Random) -> Puzzle:
    """One puzzle of `topic` (one of TOPICS)."""
    try:
        gen = GENERATORS[topic]
    except KeyError:
        raise ValueError(f"no procedural generator for topic {topic!r}; one of: {', '.join(TOPICS)}") from None
    return gen(rng)


def generate_many(topic: str, n: int, seed: int = 0) -> list[Puzzle]:
    rng = random.Random(f"{topic}:{seed}")
    return [generate(topic, rng) for _ in range(n)]
