"""The `runner run` commands that evaluate a promotion candidate and an alias holder on the same questions.

A command is only offered once it validates: it uses an eval job file of this project (`jobs/eval-*.yaml`) whose
image and backend fit the candidate's training job, and `--set` overrides that replace the file's own target.
When one side already has an `eval` run, the other is evaluated with that run's job file, so both land on its
question set; otherwise both are evaluated with the fitting job.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.paths import PROJECT_ROOT
from runner.registry.evidence import Eval, question_selection

if TYPE_CHECKING:
    from runner.runs import Run

TARGET_KEYS = ("model", "run", "registry")


@dataclass(frozen=True)
class Target:
    """What an eval command scores: a run's checkpoint (`run` + `checkpoint`) or a registry version."""

    run: str | None = None
    checkpoint: str | None = None
    registry: str | None = None

    def overrides(self, file_targets: list[str]) -> list[str]:
        key = "run" if self.run else "registry"
        sets = [f"{k}=null" for k in file_targets if k != key]
        return sets + ([f"run={self.run}", f"checkpoint={self.checkpoint}"] if self.run else [f"registry={self.registry}"])


@dataclass(frozen=True)
class EvalJobFile:
    path: Path
    targets: list[str]
    image: str
    backend: str
    selection: dict[str, Any]
    passes: int  # scoring passes over the questions: the cheapest fitting job is suggested
    fixes: tuple[str, ...] = ()  # overrides that make the file fit the candidate (its image flavour)


def _shown(path: Path) -> str:
    """The path as the user can type it from here."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    except ValueError:
        return str(path)


def _load(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> EvalJobFile | None:
    """The eval job in `path` with `overrides` applied, or None when it is not a valid single-target eval job."""
    from runner.spec import SpecError, load_job
    from runner.spec.eval import EvalJob

    try:
        job = load_job(path, list(overrides))
    except (SpecError, OSError, ValueError):
        return None
    spec = job.spec
    if not isinstance(spec, EvalJob) or spec.models:
        return None
    cal = spec.calibration
    passes = (2 if spec.scoring.method == "both" else 1) * (1 + 4 * cal.letter_bias + 4 * cal.debias)
    return EvalJobFile(path, spec.targets(), spec.image, spec.backend, question_selection(job.stored_data()), passes)


def command(job: EvalJobFile, target: Target) -> str | None:
    """`runner run FILE --set ...` for `target`, or None when those overrides do not validate."""
    sets = target.overrides(job.targets) + list(job.fixes)
    if _load(job.path, sets) is None:
        return None
    return shlex.join(["runner", "run", _shown(job.path), *(x for s in sets for x in ("--set", s))])


def fitting_job(job_data: dict[str, Any]) -> EvalJobFile | None:
    """The project's eval job that suits a training job: same image flavour first (a CPU candidate gets a CPU
    job, a ROCm one a ROCm job), then the same backend, then one that already targets a run, then the fewest
    scoring passes (letter-bias and debiasing passes are diagnostics the gate does not need)."""
    image, backend = job_data.get("image", "cpu"), job_data.get("backend", "local")
    found = [j for p in sorted((PROJECT_ROOT / "jobs").glob("eval*.yaml")) if (j := _load(p)) is not None]
    if not found:
        return None
    best = max(found, key=lambda j: (j.image == image, j.backend == backend, j.targets == ["run"], -j.passes,
                                     -len(j.path.name)))
    return best if best.image == image else replace(best, fixes=(f"image={image}",))


def _file_of(ev: Eval) -> Path | None:
    if not ev.job_file:
        return None
    p = Path(ev.job_file)
    for c in ([p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]):
        if c.is_file():
            return c
    return None


def _same_questions(ev: Eval, target: Target, image: str | None) -> str | None:
    """The command that evaluates `target` with the job file behind `ev`, when it still selects ev's questions."""
    path = _file_of(ev)
    if path is None or ev.questions is None:
        return None
    job = _load(path)
    if job is None or (image is not None and job.image != image):
        return None
    cmd = command(job, target)
    if cmd is None:
        return None
    done = _load(path, target.overrides(job.targets) + list(job.fixes))
    return cmd if done is not None and done.selection == ev.questions else None


def shared_eval_advice(run: Run, checkpoint: Path, cands: list[Eval], holder_ref: str, held: list[Eval]) -> str:
    """What to run so that candidate and holder share an eval set, as lines the user can paste."""
    cand = Target(run=run.ref, checkpoint=checkpoint.name)
    holder = Target(registry=holder_ref)
    image = run.job_data().get("image", "cpu")
    for h in (e for e in held if e.kind == "eval-run"):
        cmd = _same_questions(h, cand, image)
        if cmd:
            return (f"The holder was evaluated on {h.eval_set} by {h.source}; evaluate the candidate on the same "
                    f"questions, then promote again:\n  {cmd}")
    for c in (e for e in cands if e.kind == "eval-run"):
        cmd = _same_questions(c, holder, None)
        if cmd:
            return (f"The candidate was evaluated on {c.eval_set} by {c.source}; evaluate the holder on the same "
                    f"questions, then promote again:\n  {cmd}")
    job = fitting_job(run.job_data())
    cmds = [command(job, t) for t in (cand, holder)] if job else []
    if job is None or not cmds or None in cmds:
        return ("Evaluate both with one eval job (`run: " + run.ref + f"` + `checkpoint: {checkpoint.name}`, then "
                f"`registry: {holder_ref}`, the same `data:`), then promote again")
    why = ("Each training run validates on its own split" if all(e.kind == "val" for e in cands + held)
           else "Neither has an `eval` run the other can repeat")
    return (f"{why}, so evaluate both on the same questions with {_shown(job.path)}, then promote again:\n"
            + "\n".join(f"  {c}" for c in cmds))


def eval_advice(run: Run, checkpoint: Path) -> str:
    """The command that gives a checkpoint with no evaluation its first one."""
    job = fitting_job(run.job_data())
    cmd = command(job, Target(run=run.ref, checkpoint=checkpoint.name)) if job else None
    if cmd is None:
        return f"an `eval` job with `run: {run.ref}` and `checkpoint: {checkpoint.name}`"
    return f"\n  {cmd}\n"
