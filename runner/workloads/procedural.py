"""Procedural logic questions with answer keys correct by construction.

Topics: linear and circular seating arrangements, blood relations, syllogisms and alphanumeric series.
Each generator builds the facts first, derives the key by exhaustive search over every arrangement (or
Venn model) consistent with the clues, and only then writes the text; a question whose key is not unique
is never emitted.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.workloads.prompts import LETTERS

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


_ARRANGEMENTS: dict[tuple[str, int], list[tuple[int, ...]]] = {}


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


# --- blood relations --------------------------------------------------------------------------------

# Chains of "X is the <step> of Y" statements whose end-to-end relation is unambiguous, and its name
# for a male / female first person. Chains that could pass through the same person twice, or through
# a step-parent, are left out on purpose.
STEP_TERMS = {
    "parent": ("father", "mother"),
    "child": ("son", "daughter"),
    "sibling": ("brother", "sister"),
    "spouse": ("husband", "wife"),
}
RELATION_CHAINS: dict[tuple[str, ...], tuple[str, str]] = {
    ("parent",): ("father", "mother"),
    ("child",): ("son", "daughter"),
    ("sibling",): ("brother", "sister"),
    ("spouse",): ("husband", "wife"),
    ("parent", "parent"): ("grandfather", "grandmother"),
    ("child", "child"): ("grandson", "granddaughter"),
    ("sibling", "parent"): ("uncle", "aunt"),
    ("child", "sibling"): ("nephew", "niece"),
    ("parent", "sibling"): ("father", "mother"),
    ("sibling", "child"): ("son", "daughter"),
    ("spouse", "child"): ("son-in-law", "daughter-in-law"),
    ("parent", "spouse"): ("father-in-law", "mother-in-law"),
    ("sibling", "spouse"): ("brother-in-law", "sister-in-law"),
    ("spouse", "sibling"): ("brother-in-law", "sister-in-law"),
    ("child", "sibling", "parent"): ("cousin", "cousin"),
    ("parent", "parent", "sibling"): ("grandfather", "grandmother"),
    ("parent", "sibling", "parent"): ("grandfather", "grandmother"),
    ("sibling", "child", "child"): ("grandson", "granddaughter"),
    ("sibling", "parent", "sibling"): ("uncle", "aunt"),
}
RELATION_TERMS = sorted({t for pair in RELATION_CHAINS.values() for t in pair})
MALE_TERMS = sorted({p[0] for p in RELATION_CHAINS.values()} - {"cousin"})
FEMALE_TERMS = sorted({p[1] for p in RELATION_CHAINS.values()} - {"cousin"})


def blood_relation(rng: random.Random) -> Puzzle:
    chain = rng.choice(list(RELATION_CHAINS))
    people = rng.sample(NAME_POOL, len(chain) + 1)
    genders = [rng.randrange(2) for _ in people]  # 0 male, 1 female
    for i, step in enumerate(chain):
        if step == "spouse":
            genders[i + 1] = 1 - genders[i]
    statements = [
        f"{people[i]} is the {STEP_TERMS[step][genders[i]]} of {people[i + 1]}." for i, step in enumerate(chain)
    ]
    correct = RELATION_CHAINS[chain][genders[0]]
    if correct == "cousin":
        pool = ["cousin", "nephew", "niece", "brother", "sister", "uncle", "aunt"]
    else:
        same = MALE_TERMS if genders[0] == 0 else FEMALE_TERMS
        opposite = RELATION_CHAINS[chain][1 - genders[0]]
        pool = [opposite, *same]
    choices, idx = _choices(rng, correct.capitalize(), [p.capitalize() for p in pool])
    first, last = people[0], people[-1]
    question = " ".join([*statements, f"How is {first} related to {last}?"])
    path = " -> ".join(f"{people[i]} ({step} of)" for i, step in enumerate(chain)) + f" {last}"
    expl = f"Follow the chain: {path}. So {first} is {last}'s {correct}."
    return Puzzle(BLOOD_RELATIONS, question, choices, idx, expl,
                  {"chain": list(chain), "people": people, "genders": genders})


# --- syllogisms ---------------------------------------------------------------------------------------

NOUNS = [
    "pens", "books", "cups", "tables", "birds", "stones", "trees", "clocks", "rings", "lamps", "coins",
    "doors", "chairs", "kites", "boxes", "roses", "ships", "bells", "shoes", "cakes", "keys", "bats",
]
FORMS = ("all", "no", "some", "some_not")
SYLLOGISM_CHOICES = ["Only I", "Only II", "Both I and II", "Neither I nor II"]


def statement_text(form: str, a: str, b: str) -> str:
    return {"all": f"All {a} are {b}.", "no": f"No {a} are {b}.", "some": f"Some {a} are {b}.",
            "some_not": f"Some {a} are not {b}."}[form]


def _venn_models(n_terms: int) -> list[frozenset[int]]:
    # A model is the set of non-empty Venn regions (bitmask of term membership); every term is non-empty.
    regions = range(1, 2**n_terms)
    out = []
    for bits in range(1, 2 ** len(regions)):
        occupied = frozenset(r for i, r in enumerate(regions) if bits >> i & 1)
        if all(any(r >> t & 1 for r in occupied) for t in range(n_terms)):
            out.append(occupied)
    return out


def _stmt_holds(form: str, a: int, b: int, model: frozenset[int]) -> bool:
    ia, ib = 1 << a, 1 << b
    if form == "all":
        return not any(r & ia and not r & ib for r in model)
    if form == "no":
        return not any(r & ia and r & ib for r in model)
    if form == "some":
        return any(r & ia and r & ib for r in model)
    return any(r & ia and not r & ib for r in model)


_MODELS3 = _venn_models(3)
_CONTRADICTORY = {("all", "some_not"), ("some_not", "all"), ("no", "some"), ("some", "no")}


def _follows(premises: Sequence[tuple[str, int, int]], conclusion: tuple[str, int, int]) -> bool:
    models = [m for m in _MODELS3 if all(_stmt_holds(f, a, b, m) for f, a, b in premises)]
    if not models:
        raise ValueError("inconsistent premises")
    return all(_stmt_holds(*conclusion, m) for m in models)


def syllogism(rng: random.Random) -> Puzzle:
    target = rng.randrange(4)
    while True:
        terms = rng.sample(NOUNS, 3)
        premises = [(rng.choice(FORMS), 0, 1), (rng.choice(FORMS), 1, 2)]
        premises = [(f, b, a) if rng.random() < 0.3 else (f, a, b) for f, a, b in premises]
        if not any(all(_stmt_holds(f, a, b, m) for f, a, b in premises) for m in _MODELS3):
            continue
        pairs = [(0, 2), (2, 0), (0, 1), (1, 0), (1, 2), (2, 1)]
        c1 = (rng.choice(FORMS), *rng.choice(pairs))
        c2 = (rng.choice(FORMS), *rng.choice(pairs))
        if c1 == c2 or c1 in premises or c2 in premises:
            continue
        if {c1[1], c1[2]} == {c2[1], c2[2]} and (c1[0], c2[0]) in _CONTRADICTORY:
            continue  # contradictory pairs invite an "either-or" answer the four choices do not offer
        f1, f2 = _follows(premises, c1), _follows(premises, c2)
        got = {(True, False): 0, (False, True): 1, (True, True): 2, (False, False): 3}[(f1, f2)]
        if got != target:
            continue
        break
    ptext = " ".join(statement_text(f, terms[a], terms[b]) for f, a, b in premises)
    ctext = f"I. {statement_text(c1[0], terms[c1[1]], terms[c1[2]])} II. {statement_text(c2[0], terms[c2[1]], terms[c2[2]])}"
    question = f"Statements: {ptext} Conclusions: {ctext} Which conclusions follow?"
    verdict = lambda ok: "must be true" if ok else "need not be true"  # noqa: E731
    expl = (f"In every Venn diagram where both statements hold, conclusion I {verdict(f1)} and conclusion II "
            f"{verdict(f2)}. So: {SYLLOGISM_CHOICES[target]} follows.")
    return Puzzle(SYLLOGISMS, question, list(SYLLOGISM_CHOICES), target, expl,
                  {"terms": terms, "premises": premises, "conclusions": [c1, c2]})


# --- alphanumeric series -------------------------------------------------------------------------------

def _letter(i: int) -> str:
    return chr(ord("A") + i - 1)


def series(rng: random.Random) -> Puzzle:
    kind = rng.choice(["arith", "geom", "square", "recur", "interleave", "letters", "letters_growing",
                       "letter_number", "letter_pairs"])
    if kind == "arith":
        d = rng.choice([i for i in range(-9, 14) if i not in (0, 1)])
        a = rng.randint(1, 30) if d > 0 else rng.randint(3 - 6 * d, 60 - 6 * d)  # keep every term positive
        terms = [a + d * i for i in range(6)]
        shown, ans = terms[:5], str(terms[5])
        rule = f"add {d} each time" if d > 0 else f"subtract {-d} each time"
        near = [terms[5] + d, terms[5] - 1, terms[5] + 1, terms[5] + 2, terms[5] - 2]
    elif kind == "geom":
        a, r = rng.randint(1, 6), rng.choice([2, 3])
        terms = [a * r**i for i in range(6)]
        shown, ans = terms[:5], str(terms[5])
        rule = f"multiply by {r} each time"
        near = [terms[5] + terms[4], terms[5] - a, terms[5] + 2, terms[5] - 2, terms[4] * (r + 1)]
    elif kind == "square":
        c, s = rng.randint(-3, 5), rng.randint(1, 4)
        terms = [(s + i) ** 2 + c for i in range(6)]
        shown, ans = terms[:5], str(terms[5])
        rule = "the differences grow by 2 each time (consecutive squares" + (f" plus {c})" if c > 0 else f" minus {-c})" if c < 0 else ")")
        near = [terms[5] + 1, terms[5] - 1, terms[5] + 2, terms[5] - 2, 2 * terms[4] - terms[3]]
    elif kind == "recur":
        m, b, a = rng.choice([2, 3]), rng.choice([-1, 1, 2]), rng.randint(1, 5)
        terms = [a]
        for _ in range(5):
            terms.append(terms[-1] * m + b)
        shown, ans = terms[:5], str(terms[5])
        rule = f"multiply by {m} then add {b}" if b > 0 else f"multiply by {m} then subtract {-b}"
        near = [terms[5] + 1, terms[5] - 1, terms[5] + 2, terms[5] - 2, terms[4] * m]
    elif kind == "interleave":
        a1, d1 = rng.randint(1, 20), rng.choice([2, 3, 4, 5])
        a2, d2 = rng.randint(30, 60), rng.choice([-2, -3, -4, -5])
        terms = []
        for i in range(4):
            terms += [a1 + d1 * i, a2 + d2 * i]
        shown, ans = terms[:7], str(terms[7])
        rule = f"two alternating series: one adds {d1}, the other subtracts {-d2}"
        near = [terms[7] + d2, terms[7] - d2, terms[6] + d1, terms[7] + 1, terms[7] - 1]
    elif kind in ("letters", "letters_growing"):
        if kind == "letters":
            d = rng.choice([2, 3, 4, 5])
            start = rng.randint(1, 26 - 5 * d)
            vals = [start + d * i for i in range(6)]
            rule = f"skip {d - 1} letter{'s' if d > 2 else ''} each time"
        else:
            d0 = rng.choice([1, 2])
            start = rng.randint(1, 26 - (5 * d0 + 10))
            vals = [start]
            for i in range(5):
                vals.append(vals[-1] + d0 + i)
            rule = "the gap between letters grows by one each time"
        shown, ans = [_letter(v) for v in vals[:5]], _letter(vals[5])
        near_vals = [vals[5] + 1, vals[5] - 1, vals[5] + 2, vals[5] - 2, vals[5] + 3]
        near = [_letter(v) for v in near_vals if 1 <= v <= 26]
    elif kind == "letter_number":
        d = rng.choice([1, 2, 3])
        start = rng.randint(1, 26 - 5 * d)
        n0, nd = rng.randint(1, 9), rng.choice([2, 3, 4, 5])
        pairs = [(start + d * i, n0 + nd * i) for i in range(6)]
        shown = [f"{_letter(v)}{k}" for v, k in pairs[:5]]
        ans = f"{_letter(pairs[5][0])}{pairs[5][1]}"
        rule = f"the letter moves {d} place{'s' if d > 1 else ''} forward and the number grows by {nd}"
        lv, nv = pairs[5]
        near = [f"{_letter(lv + 1)}{nv}" if lv < 26 else f"{_letter(lv - 2)}{nv}", f"{_letter(lv)}{nv + 1}",
                f"{_letter(lv - 1)}{nv}", f"{_letter(lv)}{nv - nd + 1}", f"{_letter(lv)}{nv + nd}"]
    else:  # letter_pairs: first letter forwards, second backwards
        d1, d2 = rng.choice([1, 2]), rng.choice([1, 2])
        s1, s2 = rng.randint(1, 26 - 5 * d1), rng.randint(1 + 5 * d2, 26)
        pairs = [(s1 + d1 * i, s2 - d2 * i) for i in range(6)]
        shown = [_letter(a) + _letter(b) for a, b in pairs[:5]]
        a, b = pairs[5]
        ans = _letter(a) + _letter(b)
        rule = f"the first letter moves {d1} forward, the second {d2} back"
        near = [_letter(a) + _letter(b + 1), _letter(a + 1 if a < 26 else a - 2) + _letter(b),
                _letter(a - 1) + _letter(b), _letter(a) + _letter(b - 1 if b > 1 else b + 2), _letter(b) + _letter(a)]
    pool = [x for x in dict.fromkeys(str(v) for v in near) if x != ans and not x.startswith("-") and "@" not in x]
    for extra in range(3, 40):  # near the ends of the alphabet or zero some near misses fall out; add wider ones
        if len(pool) >= 3:
            break
        if ans.lstrip("-").isdigit():
            cand = str(int(ans) + extra)
        else:
            cand = "".join(_letter((ord(ch) - 64 + extra - 1) % 26 + 1) if ch.isalpha() else ch for ch in ans)
        if cand != ans and cand not in pool:
            pool.append(cand)
    choices, idx = _choices(rng, ans, pool)
    question = f"What comes next in the series: {', '.join(str(s) for s in shown)}, ?"
    expl = f"The rule is: {rule}. So the next term is {ans}."
    return Puzzle(SERIES, question, choices, idx, expl, {"kind": kind, "shown": [str(s) for s in shown]})


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
