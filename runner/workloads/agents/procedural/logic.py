"""Blood relations, syllogisms (keys by exhaustive Venn models) and alphanumeric series."""

from __future__ import annotations

import random
from collections.abc import Sequence

from runner.workloads.agents.procedural.puzzle import (
    BLOOD_RELATIONS,
    NAME_POOL,
    SERIES,
    SYLLOGISMS,
    Puzzle,
    _choices,
)

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


_MODELS3 = _venn_models(3)
