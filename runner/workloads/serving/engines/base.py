"""The base of the engine-backed models (see the package docstring): EngineModel, its errors, and the helpers
the scorer and the agents use to take one where they take a transformers model."""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Sequence
from typing import Any

import torch


class EngineError(RuntimeError):
    """An engine that cannot start or answer; the message says what and how to fix it."""


class EngineModel:
    """Base of the engine-backed models. Subclasses implement the two calls and `close`."""

    engine = "?"

    def __init__(self, description: str) -> None:
        self.description = description
        _LIVE.add(self)

    def letter_logprobs(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                        timeout_s: float | None = None) -> torch.Tensor:
        """[len(prompts), len(letter_ids)] float32 log-probabilities of each letter token as the next token
        after each prompt, normalised over `letter_ids`."""
        raise NotImplementedError

    def generate_ids(self, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, timeout_s: float | None = None) -> list[int]:
        """The new token ids of one continuation (greedy at temperature 0), ending at the end-of-text token
        (not included) or after `max_new_tokens`."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engine (its process or its model). Idempotent."""

    # The agents treat a model as inference-only; these keep the few torch-module calls they make harmless.
    def eval(self) -> EngineModel:
        return self

    def parameters(self) -> Any:
        return iter([torch.zeros(0)])


_LIVE: weakref.WeakSet[EngineModel] = weakref.WeakSet()


@atexit.register
def close_engines() -> None:
    """Stop every engine this process started (also at exit: an engine's server never outlives its starter)."""
    for m in list(_LIVE):
        try:
            m.close()
        except Exception:  # noqa: S110 - best effort at exit
            pass


def is_engine(model: Any) -> bool:
    return isinstance(model, EngineModel)


def engine_letter_logits(model: EngineModel, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                         n_choices: Sequence[int], width: int) -> torch.Tensor:
    """[n, width] letter log-probabilities from an engine, -inf past each item's own choices (as the builtin
    scorer's letter logits: a softmax of a row gives the same distribution over its letters)."""
    out = torch.full((len(prompts), width), float("-inf"))
    if not prompts:
        return out
    lp = model.letter_logprobs(prompts, letter_ids[:width])
    for r, k in enumerate(n_choices):
        out[r, :k] = lp[r, :k]
    return out
