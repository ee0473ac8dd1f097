"""Procedural questions: every key is confirmed by an independent brute-force checker that reads only the text.

The checkers below parse the question as a reader would and search every arrangement, family tree,
Venn model or series rule; they share no code with the generators.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest

from runner.workloads.agents import procedural
from runner.workloads.agents.format_filter import check_question

N_PER_TOPIC = 500
ORD = {"second": 2, "third": 3}
WORDS = {"one": 1, "two": 2}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.?]+[.?]", text)]


def _key_text(q: dict) -> str:
    letter = q["answer"]
    choice = next(c for c in q["choices"] if c.startswith(letter + ") "))
    return choice[3:]


# --- seating ---------------------------------------------------------------------------------------


def _seating_checker(q: dict) -> set[str]:
    """Every possible answer over all seatings consistent with the clues (a correct key gives one)."""
    sents = _sentences(q["question"])
    intro = sents[0]
    names = re.findall(r"\b([A-Z])\b", intro.split(" sit ")[0])
    circular = "round table" in intro
    assert "facing the centre" in intro if circular else "facing north" in intro
    n = len(names)
    *clues, query = sents[1:]

    # A seating is a list of names; linear: left to right as they face north; circular: going clockwise
    # seen from above, which for people facing the centre is towards each one's left.
    def offset(s: list[str], x: str, y: str) -> int:
        return (s.index(x) - s.index(y)) % n if circular else s.index(x) - s.index(y)

    def side_sign(side: str) -> int:
        # linear: left = lower index; circular: left = clockwise = +1
        if circular:
            return 1 if side == "left" else -1
        return -1 if side == "left" else 1

    def is_at(s: list[str], x: str, y: str, k: int) -> bool:
        """x sits k seats from y (signed)."""
        return offset(s, x, y) == (k % n if circular else k)

    tests: list[Callable[[list[str]], bool]] = []
    for c in clues:
        if m := re.fullmatch(r"(\w) sits at the (left|right) end\.", c):
            x, side = m.groups()
            tests.append(lambda s, x=x, side=side: s.index(x) == (0 if side == "left" else n - 1))
        elif m := re.fullmatch(r"(\w) sits (second|third) from the (left|right) end\.", c):
            x, k, side = m.group(1), ORD[m.group(2)], m.group(3)
            tests.append(lambda s, x=x, k=k, side=side: s.index(x) == (k - 1 if side == "left" else n - k))
        elif m := re.fullmatch(r"(\w) does not sit at either end\.", c):
            tests.append(lambda s, x=m.group(1): s.index(x) not in (0, n - 1))
        elif m := re.fullmatch(r"(\w) sits immediately to the (left|right) of (\w)\.", c):
            x, side, y = m.groups()
            tests.append(lambda s, x=x, y=y, side=side: is_at(s, x, y, side_sign(side)))
        elif m := re.fullmatch(r"(\w) sits second to the (left|right) of (\w)\.", c):
            x, side, y = m.groups()
            tests.append(lambda s, x=x, y=y, side=side: is_at(s, x, y, 2 * side_sign(side)))
        elif m := re.fullmatch(r"Exactly (one person sits|(\w+) people sit) between (\w) and (\w)\.", c):
            k = 1 if m.group(2) is None else int(m.group(2))
            x, y = m.group(3), m.group(4)
            assert not circular
            tests.append(lambda s, x=x, y=y, k=k: abs(s.index(x) - s.index(y)) == k + 1)
        elif m := re.fullmatch(r"(\w) does not sit next to (\w)\.", c):
            x, y = m.groups()
            tests.append(lambda s, x=x, y=y: offset(s, x, y) not in ((1, n - 1) if circular else (1, -1)))
        elif m := re.fullmatch(r"(\w) sits opposite (\w)\.", c):
            x, y = m.groups()
            assert circular and n % 2 == 0
            tests.append(lambda s, x=x, y=y: offset(s, x, y) == n // 2)
        elif m := re.fullmatch(r"(\w) sits between (\w) and (\w)\.", c):
            x, y, z = m.groups()
            assert circular
            tests.append(lambda s, x=x, y=y, z=z: {offset(s, y, x), offset(s, z, x)} == {1, n - 1})
        else:
            raise AssertionError(f"checker cannot read clue {c!r}")

    if m := re.fullmatch(r"Who sits at the (left|right) end\?", query):
        ask: Callable[[list[str]], str | None] = lambda s: s[0] if m.group(1) == "left" else s[-1]  # noqa: E731
    elif m := re.fullmatch(r"Who sits (second|third) from the (left|right) end\?", query):
        k = ORD[m.group(1)]
        ask = lambda s: s[k - 1] if m.group(2) == "left" else s[n - k]  # noqa: E731
    elif re.fullmatch(r"Who sits exactly in the middle of the row\?", query):
        ask = lambda s: s[n // 2]  # noqa: E731
    elif m := re.fullmatch(r"Who sits immediately to the (left|right) of (\w)\?", query):
        side, x = m.groups()

        def ask(s: list[str]) -> str | None:
            i = s.index(x) + side_sign(side)
            if circular:
                return s[i % n]
            return s[i] if 0 <= i < n else None
    elif m := re.fullmatch(r"Who sits second to the (left|right) of (\w)\?", query):
        side, x = m.groups()
        assert circular
        ask = lambda s: s[(s.index(x) + 2 * side_sign(side)) % n]  # noqa: E731
    elif m := re.fullmatch(r"Who sits opposite (\w)\?", query):
        ask = lambda s: s[(s.index(m.group(1)) + n // 2) % n]  # noqa: E731
    else:
        raise AssertionError(f"checker cannot read query {query!r}")

    answers = set()
    seatings = ([names[0], *p] for p in itertools.permutations(names[1:])) if circular else (
        list(p) for p in itertools.permutations(names))
    for s in seatings:
        if all(t(s) for t in tests):
            answers.add(ask(s))
    return answers


# --- blood relations ----------------------------------------------------------------------------------

MALE = {"father", "son", "brother", "husband"}


def _blood_checker(q: dict) -> str:
    sents = _sentences(q["question"])
    *facts, query = sents
    a, d = re.fullmatch(r"How is (\w) related to (\w)\?", query).groups()  # type: ignore[union-attr]
    parents: dict[str, set[str]] = {}
    sib_class: dict[str, str] = {}
    spouse: dict[str, str] = {}
    gender: dict[str, str] = {}

    def cls(x: str) -> str:
        while sib_class.get(x, x) != x:
            x = sib_class[x]
        return x

    for f in facts:
        x, term, y = re.fullmatch(r"(\w) is the ([\w-]+) of (\w)\.", f).groups()  # type: ignore[union-attr]
        gender[x] = "m" if term in MALE else "f"
        if term in ("father", "mother"):
            parents.setdefault(y, set()).add(x)
        elif term in ("son", "daughter"):
            parents.setdefault(x, set()).add(y)
        elif term in ("brother", "sister"):
            sib_class[cls(x)] = cls(y)
        elif term in ("husband", "wife"):
            spouse[x], spouse[y] = y, x
        else:
            raise AssertionError(term)
    people = {p for f in facts for p in re.findall(r"\b([A-Z])\b", f)}

    def parents_of(p: str) -> set[str]:
        if p.startswith("#"):
            return set()
        members = [m for m in people if cls(m) == cls(p)]
        out = set().union(*(parents.get(m, set()) for m in members))
        return out or ({"#" + cls(p)} if len(members) > 1 else set())

    def ancestors(p: str) -> dict[str, int]:
        depth, frontier = {p: 0}, [p]
        while frontier:
            nxt = []
            for x in frontier:
                for par in parents_of(x):
                    if par not in depth:
                        depth[par] = depth[x] + 1
                        nxt.append(par)
            frontier = nxt
        return depth

    def blood(x: str, y: str) -> tuple[int, int] | None:
        ax, ay = ancestors(x), ancestors(y)
        common = [(ax[c] + ay[c], ax[c], ay[c]) for c in ax if c in ay]
        return min(common)[1:] if common else None

    names = {(0, 1): ("father", "mother"), (0, 2): ("grandfather", "grandmother"), (1, 0): ("son", "daughter"),
             (2, 0): ("grandson", "granddaughter"), (1, 1): ("brother", "sister"), (1, 2): ("uncle", "aunt"),
             (2, 1): ("nephew", "niece"), (2, 2): ("cousin", "cousin")}
    g = 0 if gender[a] == "m" else 1
    if spouse.get(a) == d:
        return ("husband", "wife")[g]
    if (r := blood(a, d)) is not None:
        return names[r][g]
    if a in spouse and (r := blood(spouse[a], d)) is not None:
        return {(1, 0): ("son-in-law", "daughter-in-law"), (1, 1): ("brother-in-law", "sister-in-law")}[r][g]
    if d in spouse and (r := blood(a, spouse[d])) is not None:
        return {(0, 1): ("father-in-law", "mother-in-law"), (1, 1): ("brother-in-law", "sister-in-law")}[r][g]
    raise AssertionError(f"no relation found: {q['question']}")


# --- syllogisms -------------------------------------------------------------------------------------


def _syllogism_checker(q: dict) -> str:
    m = re.fullmatch(r"Statements: (.*) Conclusions: I\. (.*) II\. (.*) Which conclusions follow\?",
                     q["question"])
    assert m, q["question"]
    stmt = re.compile(r"(All|No|Some) (\w+) are (not )?(\w+)\.")
    premises = [x.groups() for x in stmt.finditer(m.group(1))]
    c1, c2 = stmt.fullmatch(m.group(2)), stmt.fullmatch(m.group(3))
    assert c1 and c2 and len(premises) >= 2
    terms = sorted({t for p in [*premises, c1.groups(), c2.groups()] for t in (p[1], p[3])})
    assert len(terms) == 3
    kinds = [frozenset(t for i, t in enumerate(terms) if bits >> i & 1) for bits in range(1, 8)]

    def holds(s: tuple, world: list[frozenset[str]]) -> bool:
        q_, x, neg, y = s
        xs = {i for i, e in enumerate(world) if x in e}
        ys = {i for i, e in enumerate(world) if y in e}
        if q_ == "All":
            return xs <= ys
        if q_ == "No":
            return not xs & ys
        return bool(xs - ys) if neg else bool(xs & ys)

    worlds = []
    for r in range(1, 8):
        for world in itertools.combinations(kinds, r):
            if all(any(t in e for e in world) for t in terms):
                worlds.append(list(world))
    ok = [w for w in worlds if all(holds(p, w) for p in premises)]
    assert ok, "premises contradict each other"
    f1 = all(holds(c1.groups(), w) for w in ok)
    f2 = all(holds(c2.groups(), w) for w in ok)
    return {(True, False): "Only I", (False, True): "Only II", (True, True): "Both I and II",
            (False, False): "Neither I nor II"}[(f1, f2)]


# --- series -----------------------------------------------------------------------------------------


def _numeric_predictions(xs: list[int]) -> set[int]:
    """Next terms predicted by every simple rule that fits all of `xs`."""
    out = set()
    d = [b - a for a, b in zip(xs, xs[1:], strict=False)]
    if len(set(d)) == 1:
        out.add(xs[-1] + d[0])
    dd = [b - a for a, b in zip(d, d[1:], strict=False)]
    if len(set(dd)) == 1:
        out.add(xs[-1] + d[-1] + dd[0])
    if all(x != 0 for x in xs) and all(b % a == 0 for a, b in zip(xs, xs[1:], strict=False)):
        ratios = {b // a for a, b in zip(xs, xs[1:], strict=False)}
        if len(ratios) == 1:
            out.add(xs[-1] * ratios.pop())
    if xs[1] != xs[0] and (xs[2] - xs[1]) % (xs[1] - xs[0]) == 0:
        mult = (xs[2] - xs[1]) // (xs[1] - xs[0])
        add = xs[1] - mult * xs[0]
        if all(b == mult * a + add for a, b in zip(xs, xs[1:], strict=False)):
            out.add(mult * xs[-1] + add)
    if len(xs) >= 5:
        ev, od = xs[0::2], xs[1::2]
        de, do = {b - a for a, b in zip(ev, ev[1:], strict=False)}, {b - a for a, b in zip(od, od[1:], strict=False)}
        if len(de) == 1 and len(do) == 1:
            out.add((ev if len(xs) % 2 == 0 else od)[-1] + (de if len(xs) % 2 == 0 else do).pop())
    return out


def _series_checker(q: dict) -> set[str]:
    m = re.fullmatch(r"What comes next in the series: (.*), \?", q["question"])
    assert m, q["question"]
    terms = m.group(1).split(", ")
    if all(re.fullmatch(r"-?\d+", t) for t in terms):
        return {str(v) for v in _numeric_predictions([int(t) for t in terms])}
    if all(re.fullmatch(r"[A-Z]+", t) for t in terms) or all(re.fullmatch(r"[A-Z]\d+", t) for t in terms):
        parts = [re.findall(r"[A-Z]|\d+", t) for t in terms]
        width = len(parts[0])
        assert all(len(p) == width for p in parts)
        per_part = []
        for j in range(width):
            col = [p[j] for p in parts]
            if col[0].isdigit():
                per_part.append({str(v) for v in _numeric_predictions([int(c) for c in col])})
            else:
                per_part.append({chr(64 + v) for v in _numeric_predictions([ord(c) - 64 for c in col]) if 1 <= v <= 26})
        return {"".join(p) for p in itertools.product(*per_part)}
    raise AssertionError(f"checker cannot read series {terms}")


CHECKERS: dict[str, Callable[[dict], object]] = {
    procedural.SEATING_LINEAR: _seating_checker,
    procedural.SEATING_CIRCULAR: _seating_checker,
    procedural.BLOOD_RELATIONS: _blood_checker,
    procedural.SYLLOGISMS: _syllogism_checker,
    procedural.SERIES: _series_checker,
}


@pytest.mark.parametrize("topic", procedural.TOPICS)
def test_500_questions_per_topic_pass_the_format_filter_and_every_key_is_right(topic: str) -> None:
    puzzles = procedural.generate_many(topic, N_PER_TOPIC, seed=7)
    assert len(puzzles) == N_PER_TOPIC
    for p in puzzles:
        q = p.to_tournament()
        assert check_question(q) == [], (q, check_question(q))
        found = CHECKERS[topic](q)
        key = _key_text(q)
        if isinstance(found, set):
            # exactly one answer is possible, it is the key, and no other choice is
            assert found == {key}, (q, found)
        else:
            assert found.lower() == key.lower(), (q, found)
    # answer keys are spread over the letters (a judge would notice "always B")
    letters = [p.answer for p in puzzles]
    assert all(letters.count(i) > N_PER_TOPIC * 0.15 for i in range(4))


def test_generation_is_reproducible_by_seed() -> None:
    a = procedural.generate_many(procedural.SEATING_LINEAR, 5, seed=3)
    b = procedural.generate_many(procedural.SEATING_LINEAR, 5, seed=3)
    c = procedural.generate_many(procedural.SEATING_LINEAR, 5, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_unknown_topic_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no procedural generator for topic 'astronomy'"):
        procedural.generate_many("astronomy", 1)
