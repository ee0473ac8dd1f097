"""Every job kind and the model that validates its files, in one table.
The kind modules never import this one: the table imports them all, so there is no import-order registration."""

from __future__ import annotations

from runner.spec.eval import EvalJob
from runner.spec.models import JobBase, PrepareJob, TrainJob
from runner.spec.serve import ServeJob
from runner.spec.tournament import TournamentJob

JOB_MODELS: dict[str, type[JobBase]] = {
    "prepare": PrepareJob,
    "train": TrainJob,
    "eval": EvalJob,
    "serve": ServeJob,
    "tournament": TournamentJob,
}
