"""Non-finite losses and gradient norms: stop the run as failed (the default), or skip the step's update.

Checked after the backward pass and gradient clipping, before the optimizer step, on values every process
shares (the summed loss, the global gradient norm), so all processes stop or skip the same step together."""

from __future__ import annotations

import math
from typing import Any

# A run that skips this many steps in a row is not training: its weights are most likely non-finite already.
MAX_SKIPS_IN_A_ROW = 10


class NonFiniteError(Exception):
    """The run must stop: a non-finite loss or gradient norm (what, at which step, and what to change)."""


class NonFiniteGuard:
    def __init__(self, train: Any, skipped: int = 0):
        self.skip = getattr(train, "on_nonfinite", "stop") == "skip"
        self.can_skip = "on_nonfinite" in getattr(type(train), "model_fields", {})
        self.lr = train.lr
        self.skipped = skipped  # steps skipped by this run, across resumes
        self.in_a_row = 0
        self.reason = ""  # what was non-finite in the last step checked

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether step `step` may apply its update; False: skip it. Raises NonFiniteError to stop the run."""
        if not math.isfinite(loss):
            what = f"loss is {loss}"
        elif not math.isfinite(grad_norm):
            what = f"gradient norm is {grad_norm}"
        else:
            self.in_a_row = 0
            return True
        self.reason = what
        hint = f"lower train.lr (now {self.lr:g}) or check the data"
        if not self.skip:
            alt = "; or set train.on_nonfinite: skip to skip such steps" if self.can_skip else ""
            raise NonFiniteError(f"{what} at step {step}: {hint}{alt} (the update of step {step} was not applied)")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise NonFiniteError(
                f"{what} at step {step}, the {self.in_a_row}th step in a row skipped (train.on_nonfinite: skip): "
                f"the weights are likely non-finite already; {hint}"
            )
        return False
