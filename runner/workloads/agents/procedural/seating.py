"""Linear and circular seating puzzles: clues are checked against every arrangement, keys are unique."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from runner.workloads.agents.procedural.puzzle import (
    NAME_POOL,
    ORDINALS,
    SEATING_CIRCULAR,
    SEATING_LINEAR,
    Puzzle,
    _choices,
    _names,
)

Clue = tuple[Any, ...]


def _linear_true_clues(pos: Sequence[int], n: int) -> list[Clue]:
    """Every clue of the supported kinds that holds for `pos` (person -> seat, 0 = left end)."""
    out: list[Clue] = []
    for x in range(n):
        if pos[x] == 0:
            out.append(("end", x, "left"))
        if pos[x] == n - 1:
            out.append(("end", x, "right"))
        for k in (2, 3):
            if pos[x] == k - 1:
                out.append(("nth", x, k, "left"))
            if pos[x] == n - k:
                out.append(("nth", x, k, "right"))
        if 0 < pos[x] < n - 1:
            out.append(("not_end", x))
        for y in range(n):
            if x == y:
                continue
            d = pos[x] - pos[y]
            if d == -1:
                out.append(("imm", x, y, "left"))
            if d == 1:
                out.append(("imm", x, y, "right"))
            if d == -2:
                out.append(("kth", x, y, 2, "left"))
            if d == 2:
                out.append(("kth", x, y, 2, "right"))
            if x < y and abs(d) in (2, 3):
                out.append(("between", x, y, abs(d) - 1))
            if x < y and abs(d) > 1:
                out.append(("not_next", x, y))
    return out


def _linear_holds(c: Clue, pos: Sequence[int], n: int) -> bool:
    kind = c[0]
    if kind == "end":
        return pos[c[1]] == (0 if c[2] == "left" else n - 1)
    if kind == "nth":
        return pos[c[1]] == (c[2] - 1 if c[3] == "left" else n - c[2])
    if kind == "not_end":
        return 0 < pos[c[1]] < n - 1
    if kind == "imm":
        return pos[c[1]] - pos[c[2]] == (-1 if c[3] == "left" else 1)
    if kind == "kth":
        return pos[c[1]] - pos[c[2]] == (-c[3] if c[4] == "left" else c[3])
    if kind == "between":
        return abs(pos[c[1]] - pos[c[2]]) == c[3] + 1
    if kind == "not_next":
        return abs(pos[c[1]] - pos[c[2]]) > 1
    raise ValueError(kind)


def _linear_text(c: Clue, names: Sequence[str]) -> str:
    kind = c[0]
    if kind == "end":
        return f"{names[c[1]]} sits at the {c[2]} end."
    if kind == "nth":
        return f"{names[c[1]]} sits {ORDINALS[c[2]]} from the {c[3]} end."
    if kind == "not_end":
        return f"{names[c[1]]} does not sit at either end."
    if kind == "imm":
        return f"{names[c[1]]} sits immediately to the {c[3]} of {names[c[2]]}."
    if kind == "kth":
        return f"{names[c[1]]} sits {ORDINALS[c[3]]} to the {c[4]} of {names[c[2]]}."
    if kind == "between":
        who = "one person sits" if c[3] == 1 else f"{c[3]} people sit"
        return f"Exactly {who} between {names[c[1]]} and {names[c[2]]}."
    if kind == "not_next":
        return f"{names[c[1]]} does not sit next to {names[c[2]]}."
    raise ValueError(kind)


def _circular_true_clues(seat: Sequence[int], n: int) -> list[Clue]:
    """Clues that hold for `seat` (person -> seat, seats numbered clockwise; facing the centre, left = clockwise)."""
    out: list[Clue] = []
    for x in range(n):
        for y in range(n):
            if x == y:
                continue
            d = (seat[x] - seat[y]) % n
            if d == 1:
                out.append(("imm", x, y, "left"))
            if d == n - 1:
                out.append(("imm", x, y, "right"))
            if d == 2 and n > 4:
                out.append(("kth", x, y, 2, "left"))
            if d == n - 2 and n > 4:
                out.append(("kth", x, y, 2, "right"))
            if x < y and n % 2 == 0 and d == n // 2:
                out.append(("opposite", x, y))
            if x < y and d not in (1, n - 1):
                out.append(("not_next", x, y))
            for z in range(y + 1, n):
                if z != x and {(seat[y] - seat[x]) % n, (seat[z] - seat[x]) % n} == {1, n - 1}:
                    out.append(("between", x, y, z))
    return out


def _circular_holds(c: Clue, seat: Sequence[int], n: int) -> bool:
    kind = c[0]
    if kind == "imm":
        return (seat[c[1]] - seat[c[2]]) % n == (1 if c[3] == "left" else n - 1)
    if kind == "kth":
        return (seat[c[1]] - seat[c[2]]) % n == (c[3] if c[4] == "left" else n - c[3])
    if kind == "opposite":
        return (seat[c[1]] - seat[c[2]]) % n == n // 2
    if kind == "not_next":
        return (seat[c[1]] - seat[c[2]]) % n not in (1, n - 1)
    if kind == "between":
        return {(seat[c[2]] - seat[c[1]]) % n, (seat[c[3]] - seat[c[1]]) % n} == {1, n - 1}
    raise ValueError(kind)


def _circular_text(c: Clue, names: Sequence[str]) -> str:
    kind = c[0]
    if kind == "imm":
        return f"{names[c[1]]} sits immediately to the {c[3]} of {names[c[2]]}."
    if kind == "kth":
        return f"{names[c[1]]} sits {ORDINALS[c[3]]} to the {c[4]} of {names[c[2]]}."
    if kind == "opposite":
        return f"{names[c[1]]} sits opposite {names[c[2]]}."
    if kind == "not_next":
        return f"{names[c[1]]} does not sit next to {names[c[2]]}."
    if kind == "between":
        return f"{names[c[1]]} sits between {names[c[2]]} and {names[c[3]]}."
    raise ValueError(kind)


def _all_linear(n: int) -> list[tuple[int, ...]]:
    # person -> seat, for every ordering
    return [tuple(p) for p in itertools.permutations(range(n))]


def _all_circular(n: int) -> list[tuple[int, ...]]:
    # person 0 fixed at seat 0: rotations are the same arrangement
    return [(0, *p) for p in itertools.permutations(range(1, n))]


def _arrangements(kind: str, n: int) -> list[tuple[int, ...]]:
    key = (kind, n)
    if key not in _ARRANGEMENTS:
        _ARRANGEMENTS[key] = _all_linear(n) if kind == "linear" else _all_circular(n)
    return _ARRANGEMENTS[key]


def _solve_clues(
    clues: Sequence[Clue],
    arrangements: Sequence[tuple[int, ...]],
    holds: Callable[[Clue, Sequence[int], int], bool],
    query: Callable[[Sequence[int]], int | None],
    n: int,
) -> set[int | None]:
    answers: set[int | None] = set()
    for a in arrangements:
        if all(holds(c, a, n) for c in clues):
            answers.add(query(a))
    return answers


def _seating(rng: random.Random, circular: bool) -> Puzzle:
    kind = "circular" if circular else "linear"
    n = rng.choice((5, 6, 7) if circular else (5, 6))
    names = rng.sample(NAME_POOL, n)
    names.sort()
    arrangements = _arrangements(kind, n)
    truth = rng.choice(arrangements)
    holds = _circular_holds if circular else _linear_holds
    true_clues = _circular_true_clues(truth, n) if circular else _linear_true_clues(truth, n)
    inverse = {s: p for p, s in enumerate(truth)}

    # The query and the clues that would give its answer away outright.
    if circular:
        x = rng.randrange(n)
        qkind = rng.choice(["imm", "kth", "opposite"] if n % 2 == 0 else ["imm", "kth"])
        side = rng.choice(["left", "right"])
        step = {"imm": 1, "kth": 2, "opposite": n // 2}[qkind] * (1 if side == "left" else -1)

        def query(a: Sequence[int]) -> int | None:
            return next(p for p in range(n) if (a[p] - a[x]) % n == step % n)

        answer = query(truth)
        assert answer is not None
        if qkind == "opposite":
            qtext = f"Who sits opposite {names[x]}?"
        elif qkind == "imm":
            qtext = f"Who sits immediately to the {side} of {names[x]}?"
        else:
            qtext = f"Who sits second to the {side} of {names[x]}?"
        direct = {c for c in true_clues if {answer, x} <= set(c[1:4] if c[0] == "between" else c[1:3])
                  and c[0] in (qkind, "opposite", "imm", "kth")}
        intro = f"{_names(names)} sit around a round table facing the centre."
    else:
        qkind = rng.choice(["end", "nth", "imm", "middle"] if n % 2 else ["end", "nth", "imm"])
        side = rng.choice(["left", "right"])
        if qkind in ("end", "nth", "middle"):
            k = {"end": 1, "nth": rng.choice((2, 3)), "middle": n // 2 + 1}[qkind]
            seat = k - 1 if side == "left" else n - k

            def query(a: Sequence[int]) -> int | None:
                return a.index(seat)

            answer = inverse[seat]
            if qkind == "end":
                qtext = f"Who sits at the {side} end?"
            elif qkind == "middle":
                qtext = "Who sits exactly in the middle of the row?"
            else:
                qtext = f"Who sits {ORDINALS[k]} from the {side} end?"
            direct = {c for c in true_clues if c[0] in ("end", "nth") and c[1] == answer}
        else:
            candidates = [p for p in range(n) if (truth[p] < n - 1 if side == "right" else truth[p] > 0)]
            x = rng.choice(candidates)
            d = 1 if side == "right" else -1

            def query(a: Sequence[int]) -> int | None:
                s = a[x] + d
                return a.index(s) if 0 <= s < n else None

            answer = query(truth)
            assert answer is not None
            qtext = f"Who sits immediately to the {side} of {names[x]}?"
            direct = {c for c in true_clues if c[0] == "imm" and {c[1], c[2]} == {x, answer}}
        intro = f"{_names(names)} sit in a row facing north."

    pool = [c for c in true_clues if c not in direct]
    rng.shuffle(pool)
    # Add true clues until every arrangement they allow gives the same answer, then drop the redundant ones.
    clues: list[Clue] = []
    for c in pool:
        clues.append(c)
        if _solve_clues(clues, arrangements, holds, query, n) == {answer}:
            break
    else:
        raise RuntimeError("clues do not determine the answer")
    for c in list(clues):
        trial = [d for d in clues if d != c]
        if _solve_clues(trial, arrangements, holds, query, n) == {answer}:
            clues = trial
    rng.shuffle(clues)
    text_of = _circular_text if circular else _linear_text
    question = " ".join([intro, *(text_of(c, names) for c in clues), qtext])
    choices, idx = _choices(rng, names[answer], names)
    order = sorted(range(n), key=lambda p: truth[p])
    if circular:
        # walk clockwise from the first-named person
        start = truth[0]
        cw = sorted(range(n), key=lambda p: (truth[p] - start) % n)
        expl = (f"The clues fix the order going clockwise (to each person's left) from {names[0]}: "
                f"{', '.join(names[p] for p in cw)}. So the answer is {names[answer]}.")
    else:
        expl = (f"The clues allow only arrangements with this answer; one of them, left to right, is "
                f"{', '.join(names[p] for p in order)}. So the answer is {names[answer]}.")
    return Puzzle(SEATING_CIRCULAR if circular else SEATING_LINEAR, question, choices, idx, expl,
                  {"names": names, "clues": clues, "arrangement": list(truth)})


def seating_linear(rng: random.Random) -> Puzzle:
    return _seating(rng, circular=False)


def seating_circular(rng: random.Random) -> Puzzle:
    return _seating(rng, circular=True)


_ARRANGEMENTS: dict[tuple[str, int], list[tuple[int, ...]]] = {}
