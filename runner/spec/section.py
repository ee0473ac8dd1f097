"""The base of every job-file section: strict types, unknown keys rejected, no infinite or NaN numbers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Strict: `lr: "3e-3"`, `steps: true` and `batch_size: 2.0` are mistakes to report, not values to coerce;
    # and no number in a job is infinite or NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, strict=True, allow_inf_nan=False)
