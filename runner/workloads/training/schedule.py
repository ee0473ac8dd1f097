"""Learning-rate schedules (warmup, then constant, linear or cosine decay) as LambdaLR factors."""

from __future__ import annotations

import math
from typing import Any


def lr_lambda(spec: Any) -> Any:
    warm, total, kind = spec.warmup_steps, spec.steps, spec.scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - p if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))

    return f
