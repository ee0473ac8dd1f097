"""What each training step sees: curriculum order and pacing, the replay mix, and packing into a token budget.

All state is small and JSON-serialisable (`state_dict`/`load_state_dict`), so a checkpoint can resume the
exact same sample stream: same samples, same rows, same order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.spec.models import Curriculum

DIFFICULTY_LEVEL = {"easy": 0, "medium": 1, "hard": 2}


def _tie(seed: int, i: int) -> bytes:
    return hashlib.sha256(f"{seed}:{i}".encode()).digest()


def curriculum_order(
    difficulties: Sequence[str], curriculum: Curriculum, seed: int, scores: Sequence[float] | None = None
) -> list[int]:
    """Record indices, easiest first (`difficulty` from the data, `loss` from the base model's answer loss);
    ties in a seeded order. `order: none` keeps the input order (the sampler shuffles)."""
    n = len(difficulties)
    if curriculum.order == "none":
        return list(range(n))
    if curriculum.order == "loss":
        if scores is None:
            raise ValueError("curriculum.order is 'loss' but no base-model scores were given")
        return sorted(range(n), key=lambda i: (scores[i], _tie(seed, i)))
    return sorted(range(n), key=lambda i: (DIFFICULTY_LEVEL.get(difficulties[i], 1), _tie(seed, i)))


def pool_size(step: int, total_steps: int, n: int, curriculum: Curriculum) -> int:
    """How many of the (ordered) records are available at `step`: from start_fraction up to all of them at
    `full_at` of training; `linear` widens every step, `step` in `curriculum.stages` equal jumps."""
    if curriculum.pacing == "none" or n == 0:
        return n
    progress = min(1.0, step / max(1.0, curriculum.full_at * total_steps))
    if curriculum.pacing == "step":
        progress = math.floor(progress * curriculum.stages) / curriculum.stages
    frac = curriculum.start_fraction + (1.0 - curriculum.start_fraction) * progress
    return max(1, min(n, math.ceil(frac * n)))


class Sampler:
    """Indices without replacement within an epoch over a pool [0, available) that may widen over time.

    `shuffle=False` serves the pool in order (curriculum order without pacing); new indices that become
    available mid-epoch join the remaining queue.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.available = 0
        self.queue: list[int] = []

    def _shuffled(self, items: list[int], tag: str) -> list[int]:
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:{tag}").shuffle(items)
        return items

    def widen(self, available: int) -> None:
        available = min(available, self.n)
        if available > self.available:
            new = list(range(self.available, available))
            if self.shuffle:
                merged = self.queue + new
                self.queue = self._shuffled(merged, f"widen{available}")
            else:
                self.queue = self.queue + new
            self.available = available

    def peek(self) -> int:
        if not self.queue:
            self.epoch += 1 if self.available else 0
            self.queue = self._shuffled(list(range(self.available)), "epoch")
        return self.queue[0]

    def pop(self) -> int:
        i = self.peek()
        self.queue.pop(0)
        return i

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "available": self.available, "queue": list(self.queue)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epoch, self.available, self.queue = int(d["epoch"]), int(d["available"]), list(d["queue"])


@dataclass
class Pick:
    source: str  # "train" or "replay"
    index: int  # into that source's example list


class StepComposer:
    """Chooses the samples of each optimizer step under a token budget, mixing replay at a token fraction.

    Packed: samples fill `rows` rows of `row_len` tokens in order (a sample that does not fit starts a new
    row; one that would need an extra row waits for the next step). Unpacked: `rows` samples per step.
    Replay is chosen whenever the running replay share is under the target, so the realised fraction tracks
    the target to within about one sample per logging window.
    """

    def __init__(
        self,
        train_lengths: Sequence[int],
        train_order: Sequence[int],
        replay_lengths: Sequence[int],
        *,
        curriculum: Curriculum,
        replay_fraction: float,
        rows: int,
        row_len: int,
        packing: bool,
        total_steps: int,
        seed: int,
    ):
        self.train_lengths = list(train_lengths)
        self.order = list(train_order)
        self.replay_lengths = list(replay_lengths)
        self.curriculum = curriculum
        self.replay_fraction = replay_fraction if replay_lengths else 0.0
        self.rows = rows
        self.row_len = row_len
        self.packing = packing
        self.total_steps = total_steps
        ordered = curriculum.order != "none"
        self.train_sampler = Sampler(len(self.order), seed, shuffle=not (ordered and curriculum.pacing == "none"))
        self.replay_sampler = Sampler(len(self.replay_lengths), seed + 7919)
        self.replay_sampler.widen(len(self.replay_lengths))
        self.tokens = 0
        self.replay_tokens = 0

    def _next_source(self) -> str:
        if self.replay_fraction <= 0:
            return "train"
        return "replay" if self.replay_tokens < self.replay_fraction * max(1, self.tokens) else "train"

    def next_step(self, step: int) -> list[list[Pick]]:
        """The rows (packed) or single-sample rows (unpacked) of optimizer step `step`."""
        self.train_sampler.widen(pool_size(step, self.total_steps, len(self.order), self.curriculum))
        out: list[list[Pick]] = []
        fill = self.row_len
        while True:
            src = self._next_source()
            if src == "replay":
                idx = self.replay_sampler.peek()
                n = self.replay_lengths[idx]
            else:
                idx = self.order[self.train_sampler.peek()]
                n = self.train_lengths[idx]
            if self.packing:
                if fill + n > self.row_len:
                    if len(out) == self.rows:
                        break
                    out.append([])
                    fill = 0
                fill += n
            else:
                if len(out) == self.rows:
                    break
                out.append([])
            (self.replay_sampler if src == "replay" else self.train_sampler).pop()
            out[-1].append(Pick(src, idx))
            self.tokens += n
            if src == "replay":
                self.replay_tokens += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_sampler": self.train_sampler.state_dict(),
            "replay_sampler": self.replay_sampler.state_dict(),
            "tokens": self.tokens,
            "replay_tokens": self.replay_tokens,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.train_sampler.load_state_dict(d["train_sampler"])
        self.replay_sampler.load_state_dict(d["replay_sampler"])
        self.tokens = int(d["tokens"])
        self.replay_tokens = int(d["replay_tokens"])
