"""Job kind `eval`: score a base model, a run's checkpoint, a registry version, or an ensemble of them on MCQ data."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from runner.spec.models import (
    PROMPT_DESCRIPTION,
    DataSource,
    JobBase,
    ModelSpec,
    PromptSpec,
    Section,
    source_list,
)

CHECKPOINT_RE = re.compile(r"^(best|last|step-?[0-9]+|[0-9]+)$")


class EvalTarget(Section):
    """What is evaluated: exactly one of `model`, `run` or `registry`."""

    model: ModelSpec | None = Field(None, description="A base model (Hugging Face id, local directory or `tiny`).")
    run: str | None = Field(
        None,
        description="A training run: its id, `job/id`, an id prefix, or a job name (its latest run). The base "
        "model comes from the run's job.yaml; the adapter from `checkpoint`.",
    )
    checkpoint: str = Field(
        "best", description="Which checkpoint of `run`: `best`, `last` or `step-N`."
    )
    registry: str | None = Field(
        None, description="A promoted version: `NAME@alias`, `NAME:vN` or `NAME` (its latest version)."
    )
    prompt: PromptSpec | None = Field(None, description=PROMPT_DESCRIPTION)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        if not CHECKPOINT_RE.fullmatch(v):
            raise ValueError("must be `best`, `last` or `step-N` (e.g. step-200)")
        return v

    def targets(self) -> list[str]:
        return [k for k in ("model", "run", "registry") if getattr(self, k) is not None]

    def label(self) -> str:
        if self.model is not None:
            return self.model.base
        if self.run is not None:
            return f"{self.run}:{self.checkpoint}"
        return str(self.registry)


class EvalMember(EvalTarget):
    name: str | None = Field(None, description="Label of this member in the report (default: derived).")

    @model_validator(mode="after")
    def _one(self) -> EvalMember:
        if len(self.targets()) != 1:
            raise ValueError("an ensemble member needs exactly one of `model`, `run` or `registry`")
        return self


class ScoringSpec(Section):
    method: Literal["letters", "per_choice", "both"] = Field(
        "letters",
        description="`letters`: one forward pass per question, the answer-letter probabilities; `per_choice`: "
        "lm-eval style log-likelihood of each choice's text (one sequence per choice); `both` runs both and "
        "reports their agreement (the letters method decides the predictions).",
    )
    batch_size: int = Field(512, ge=1, description="Most questions per forward pass.")
    max_batch_tokens: int | None = Field(
        65536, ge=1, description="Most padded tokens per forward pass (long questions get smaller batches)."
    )
    max_length: int | None = Field(
        None, ge=8, description="Keep only the last N tokens of longer prompts (the answer position stays)."
    )
    normalize: Literal["none", "chars"] = Field(
        "none", description="`per_choice` only: divide each choice's log-likelihood by its length in characters."
    )
    compile: bool = Field(False, description="Compile the decoder layers (GPU; pays a compile once per process).")


class CalibrationSpec(Section):
    bins: int = Field(15, ge=2, le=100, description="Equal-width confidence bins for ECE and the reliability diagram.")
    letter_bias: bool = Field(
        False,
        description="Measure accuracy with the gold answer moved to each position (costs one pass per position).",
    )
    debias: bool = Field(
        False,
        description="Average the letter probabilities over cyclic shifts of the choices (costs one pass per shift); "
        "the debiased predictions become the reported ones, the plain ones are kept beside them.",
    )


class EvalJob(JobBase, EvalTarget):
    kind: Literal["eval"] = Field(description="Evaluates models on multiple-choice questions.")
    models: list[EvalMember] | None = Field(
        None, min_length=2, description="An ensemble: several members voting (instead of model/run/registry)."
    )
    ensemble: Literal["mean", "vote"] = Field(
        "mean",
        description="How the ensemble decides: `mean` averages the members' probabilities, `vote` takes the "
        "majority (ties to the higher mean probability). Both are always reported.",
    )
    data: list[DataSource] = Field(min_length=1, description="MCQ sources (any format the importers read).")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many questions (a seeded subset).")
    seed: int = Field(0, description="Seed for `limit` and the sources' own limits.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="How questions are scored.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Calibration and bias.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run; `auto` takes a GPU if present.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (CPU runs).")
    predictions: bool = Field(True, description="Write per-question predictions into eval.json.")

    @field_validator("data", mode="before")
    @classmethod
    def _sources(cls, v: object) -> object:
        return source_list(v)

    @model_validator(mode="after")
    def _one_target(self) -> EvalJob:
        given = self.targets() + (["models"] if self.models else [])
        if len(given) != 1:
            what = ", ".join(f"`{g}`" for g in given) if given else "none"
            hint = ""
            if len(given) == 2:  # typically a --set of one target on a file that names another
                a, b = given
                hint = f"; to keep `{a}` add --set {b}=null, to keep `{b}` add --set {a}=null"
            elif given:
                hint = "; keep one and clear the others with --set KEY=null"
            raise ValueError(
                f"an eval job needs exactly one of `model`, `run`, `registry` or `models` (got {what}){hint}"
            )
        return self

    def members(self) -> list[EvalMember]:
        """The models to score: the ensemble's members, or the one target."""
        if self.models:
            return list(self.models)
        return [EvalMember(model=self.model, run=self.run, checkpoint=self.checkpoint, registry=self.registry)]
