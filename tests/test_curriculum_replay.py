"""Curriculum order and pacing, and the realised replay fraction of the step composer."""

from __future__ import annotations

import random

import pytest

from runner.spec.models import Curriculum
from runner.workloads.data.curriculum import (
    DIFFICULTY_LEVEL,
    Sampler,
    StepComposer,
    curriculum_order,
    pool_size,
)

DIFFS = ["hard", "easy", "medium", "easy", "hard", "medium", "easy", "medium"] * 25


def test_difficulty_order_easy_first_and_deterministic() -> None:
    c = Curriculum(order="difficulty")
    order = curriculum_order(DIFFS, c, seed=0)
    levels = [DIFFICULTY_LEVEL[DIFFS[i]] for i in order]
    assert levels == sorted(levels)
    assert order == curriculum_order(DIFFS, c, seed=0)
    assert order != curriculum_order(DIFFS, c, seed=1)  # ties broken by the seed


def test_loss_order_uses_scores() -> None:
    scores = [3.0, 0.1, 2.0, 0.5]
    assert curriculum_order(["medium"] * 4, Curriculum(order="loss"), 0, scores) == [1, 3, 2, 0]
    with pytest.raises(ValueError):
        curriculum_order(["medium"] * 4, Curriculum(order="loss"), 0, None)


def test_linear_and_step_pacing() -> None:
    lin = Curriculum(order="difficulty", pacing="linear", start_fraction=0.2, full_at=0.5)
    sizes = [pool_size(s, 100, 1000, lin) for s in range(0, 101, 10)]
    assert sizes[0] == 200 and sizes[5] == 1000 and sizes[-1] == 1000
    assert sizes == sorted(sizes) and len(set(sizes[:6])) == 6
    stp = Curriculum(order="difficulty", pacing="step", start_fraction=0.25, full_at=0.6, stages=3)
    got = sorted({pool_size(s, 100, 1000, stp) for s in range(100)})
    assert got == [250, 500, 750, 1000]
    assert pool_size(50, 100, 1000, Curriculum()) == 1000


def test_composer_sees_easy_first_and_all_later() -> None:
    lengths = [40] * len(DIFFS)
    c = Curriculum(order="difficulty", pacing="linear", start_fraction=0.3, full_at=0.5)
    comp = StepComposer(lengths, curriculum_order(DIFFS, c, 0), [], curriculum=c, replay_fraction=0.0, rows=2,
                        row_len=200, packing=True, total_steps=100, seed=0)
    means = []
    seen: set[int] = set()
    for step in range(100):
        picks = [p.index for row in comp.next_step(step) for p in row]
        seen.update(picks)
        means.append(sum(DIFFICULTY_LEVEL[DIFFS[i]] for i in picks) / len(picks))
    assert max(means[:5]) == 0.0  # only easy questions at the start
    assert sum(means[60:]) / 40 > 0.7  # the whole pool later
    assert len(seen) == len(DIFFS)


def test_sampler_is_without_replacement_and_resumable() -> None:
    s = Sampler(10, seed=3)
    s.widen(10)
    first = [s.pop() for _ in range(10)]
    assert sorted(first) == list(range(10))
    state = s.state_dict()
    a = [s.pop() for _ in range(7)]
    s2 = Sampler(10, seed=3)
    s2.load_state_dict(state)
    assert [s2.pop() for _ in range(7)] == a


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_replay_fraction_within_two_points(fraction: float) -> None:
    rng = random.Random(0)
    train = [rng.randint(30, 300) for _ in range(500)]
    replay = [rng.randint(30, 300) for _ in range(200)]
    comp = StepComposer(train, list(range(500)), replay, curriculum=Curriculum(), replay_fraction=fraction, rows=4,
                        row_len=512, packing=True, total_steps=200, seed=0)
    for window in range(20):
        tok = rep = 0
        for step in range(10):
            for row in comp.next_step(window * 10 + step):
                assert sum((replay if p.source == "replay" else train)[p.index] for p in row) <= 512
                for p in row:
                    n = (replay if p.source == "replay" else train)[p.index]
                    tok += n
                    rep += n if p.source == "replay" else 0
        assert abs(rep / tok - fraction) <= 0.02, (window, rep / tok)


def test_composer_state_roundtrip_gives_same_stream() -> None:
    train = [50 + i % 7 for i in range(100)]
    kw = dict(curriculum=Curriculum(), replay_fraction=0.2, rows=2, row_len=256, packing=True, total_steps=50, seed=1)
    a = StepComposer(train, list(range(100)), [60] * 30, **kw)  # type: ignore[arg-type]
    for s in range(7):
        a.next_step(s)
    state = a.state_dict()
    b = StepComposer(train, list(range(100)), [60] * 30, **kw)  # type: ignore[arg-type]
    b.load_state_dict(state)
    for s in range(7, 20):
        assert [(p.source, p.index) for r in a.next_step(s) for p in r] == \
               [(p.source, p.index) for r in b.next_step(s) for p in r]
