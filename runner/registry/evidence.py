"""What a promotion rests on: which checkpoint of a run is meant (best, last, step-N) and the evaluations of
it that can be found (the run's validation, `eval` runs on it), each tied to an identified question set."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.registry.store import EXIT_REFUSED, RegistryError
from runner.stats import finite

if TYPE_CHECKING:
    from runner.runs import Run

BEST_POINTERS = ("best", "best.json", "best.txt")


def step_of(checkpoint: Path) -> int | None:
    m = re.fullmatch(r"step-0*([0-9]+)", checkpoint.name)
    return int(m.group(1)) if m else None


def _best_pointer(run: Run) -> Path | None:
    for name in BEST_POINTERS:
        p = run.checkpoints_dir / name
        if p.is_symlink() or p.is_dir():
            target = Path(os.path.realpath(p))
            return target if target.is_dir() else None
        if p.is_file():
            text = p.read_text().strip()
            with contextlib.suppress(json.JSONDecodeError):
                data = json.loads(text)
                if isinstance(data, dict):
                    text = str(data.get("checkpoint") or data.get("path") or data.get("name") or "")
            target = run.checkpoints_dir / Path(text).name
            return target if target.is_dir() else None
    return None


def _val_accuracy_at(run: Run, step: int) -> float | None:
    acc = None
    for m in run.metrics():
        if m.get("split") == "val" and m.get("step") == step and finite(m.get("accuracy")) is not None:
            acc = float(m["accuracy"])
    return acc


def select_checkpoint(run: Run, which: str) -> Path:
    cks = run.checkpoints()
    if not cks:
        raise RegistryError(f"run {run.ref} has no checkpoints in {run.checkpoints_dir}", EXIT_REFUSED)
    if which == "last":
        return cks[-1]
    if which == "best":
        best = _best_pointer(run)
        if best is not None:
            return best
        scored = [(a, c) for c in cks if (s := step_of(c)) is not None and (a := _val_accuracy_at(run, s)) is not None]
        if not scored:
            raise RegistryError(
                f"run {run.ref} marks no best checkpoint and has no validation accuracy for its checkpoints; "
                "use --checkpoint last or --checkpoint step-N", EXIT_REFUSED)
        return max(scored, key=lambda x: (x[0], step_of(x[1]) or 0))[1]
    m = re.fullmatch(r"(?:step-)?0*([0-9]+)", which)
    if not m:
        raise RegistryError(f"invalid --checkpoint {which!r}: use best, last or step-N (e.g. step-200)")
    step = int(m.group(1))
    for c in cks:
        if step_of(c) == step:
            return c
    raise RegistryError(f"run {run.ref} has no checkpoint at step {step} (has: {', '.join(c.name for c in cks)})",
                        EXIT_REFUSED)


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def val_set_id(job_data: dict[str, Any]) -> str:
    """Identifies a train job's validation questions: the data settings that decide them."""
    data = job_data.get("data") or {}
    keys = ("val", "val_fraction", "val_limit", "seed")
    ident = {k: data.get(k) for k in keys}
    if not data.get("val"):  # split off the training sources
        ident["train"] = data.get("train")
    return "val-" + _canonical_hash(ident)


def ids_set_id(ids: list[str]) -> str:
    return "ids-" + _canonical_hash(sorted(ids))


def predictions_of(obj: Any) -> dict[str, bool] | None:
    """{question id: correct} from an eval.json-like object: a `predictions` list of dicts with an id and either
    `correct` or `pred`/`prediction` + `answer`/`gold`."""
    preds = obj.get("predictions") if isinstance(obj, dict) else obj
    if not isinstance(preds, list) or not preds:
        return None
    out: dict[str, bool] = {}
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            return None
        qid = str(p.get("id", p.get("question_id", i)))
        if isinstance(p.get("correct"), bool):
            out[qid] = p["correct"]
            continue
        pred = p.get("pred", p.get("prediction", p.get("predicted")))
        gold = p.get("answer", p.get("gold", p.get("label")))
        if pred is None or gold is None:
            return None
        out[qid] = str(pred) == str(gold)
    return out


@dataclass
class Eval:
    """One accuracy measurement of a checkpoint on an identified set of questions."""

    kind: str  # "val" (the training run's validation) or "eval-run" (an `eval` job on this checkpoint)
    eval_set: str
    accuracy: float
    n: int | None
    source: str  # where the number comes from
    correct: dict[str, bool] | None = field(default=None, repr=False)
    predictions_file: str | None = None  # inside the version, once promoted
    job_file: str | None = None  # the eval job file an `eval` run was started from
    questions: dict[str, Any] | None = None  # that job's question selection (data, limit, seed)
    letters: dict[str, int] | None = field(default=None, repr=False)  # how often each letter was answered
    chance: float | None = None  # expected accuracy of guessing, from the number of choices

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "eval_set": self.eval_set, "accuracy": self.accuracy, "n": self.n,
                "source": self.source, "predictions_file": self.predictions_file, "job_file": self.job_file,
                "questions": self.questions}

    @classmethod
    def from_record(cls, rec: dict[str, Any], vdir: Path) -> Eval | None:
        """An evaluation recorded in a version's manifest, with its per-question results when they were kept."""
        try:
            ev = cls(str(rec["kind"]), str(rec["eval_set"]), float(rec["accuracy"]),
                     int(rec["n"]) if rec.get("n") else None, str(rec.get("source", "")),
                     predictions_file=rec.get("predictions_file"), job_file=rec.get("job_file"),
                     questions=rec.get("questions"))
        except (KeyError, TypeError, ValueError):
            return None
        if ev.predictions_file:
            obj = load_json(vdir / ev.predictions_file)
            ev.correct = predictions_of(obj)
            ev.letters, ev.chance = letter_facts(obj)
        return ev


def letter_facts(obj: Any) -> tuple[dict[str, int] | None, float | None]:
    """(answers per letter, chance accuracy) from per-question rows. Chance is the mean of 1/choices, taken from
    each row's `choices` or `probs`; rows without either (a training run's validation) give a lower bound on the
    number of choices: the last letter seen among answers and predictions."""
    preds = obj.get("predictions") if isinstance(obj, dict) else obj
    if not isinstance(preds, list) or not preds or not all(isinstance(p, dict) for p in preds):
        return None, None
    counts: Counter[str] = Counter()
    inverse: list[float] = []
    last = 0
    for p in preds:
        letter = p.get("pred", p.get("prediction"))
        if isinstance(letter, str) and len(letter) == 1 and letter.isalpha():
            counts[letter.upper()] += 1
        for x in (letter, p.get("answer")):
            if isinstance(x, str) and len(x) == 1 and x.isalpha():
                last = max(last, ord(x.upper()) - ord("A") + 1)
        k = p.get("choices", p.get("probs"))
        k = len(k) if isinstance(k, (list, dict)) else k
        if isinstance(k, int) and k >= 2:
            inverse.append(1 / k)
    if len(inverse) == len(preds):
        chance: float | None = sum(inverse) / len(inverse)
    else:
        chance = 1 / last if last >= 2 else None
    return (dict(counts) if counts else None), chance


def load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _val_eval(run: Run, checkpoint: Path, job_data: dict[str, Any]) -> Eval | None:
    step = step_of(checkpoint)
    acc = _val_accuracy_at(run, step) if step is not None else None
    n: int | None = None
    for m in run.metrics():
        if m.get("split") == "val" and m.get("step") == step:
            n = m.get("n") or m.get("n_val") or m.get("count") or n
    state = load_json(checkpoint / "trainer_state.json")
    if acc is None and isinstance(state, dict):
        for key in ("val_accuracy", "accuracy", "best_val_accuracy"):
            acc = finite(state.get(key))
            if acc is not None:
                break
        if acc is None and isinstance(state.get("val"), dict):
            acc = finite(state["val"].get("accuracy"))
    if acc is None:
        return None
    correct = None
    rows: Any = None
    for fn in ("val_predictions.json", "val_predictions.jsonl", "val.json"):
        p = checkpoint / fn
        if p.is_file():
            if fn.endswith(".jsonl"):
                with contextlib.suppress(json.JSONDecodeError):
                    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            else:
                rows = load_json(p)
            correct = predictions_of(rows)
            if correct:
                break
    if correct and n is None:
        n = len(correct)
    letters, chance = letter_facts(rows) if correct else (None, None)
    return Eval("val", val_set_id(job_data), acc, int(n) if n is not None else None,
                f"{run.ref} metrics.jsonl split=val step={step}", correct, letters=letters, chance=chance)


def _mentions(obj: Any, needles: tuple[str, ...]) -> bool:
    if isinstance(obj, str):
        return any(n and n in obj for n in needles)
    if isinstance(obj, dict):
        return any(_mentions(v, needles) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions(v, needles) for v in obj)
    return False


def _values_of(obj: Any, key: str) -> list[Any]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _values_of(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _values_of(v, key)]
    return []


def _eval_targets(run: Run, checkpoint: Path, eval_run: Run) -> bool:
    """Whether `eval_run` evaluated exactly this run's checkpoint: its job or eval.json names the checkpoint's
    path, or names this run and a checkpoint selector (best, last, step-N) that resolves to it."""
    ev = load_json(eval_run.dir / "eval.json")
    job = eval_run.job_data()
    ck_real = os.path.realpath(checkpoint)
    target = ev.get("target") if isinstance(ev, dict) else None
    if isinstance(target, dict):  # what the eval workload records it scored
        kind = target.get("type")
        if kind == "run":
            return os.path.realpath(str(target.get("checkpoint_path", ""))) == ck_real
        if kind == "registry":
            src = target.get("source") or {}
            return src.get("run_id") == run.id and src.get("checkpoint") == checkpoint.name
        if kind == "ensemble":  # an ensemble's accuracy is not this checkpoint's
            return False
    for src in (ev, job):
        if _mentions(src, (ck_real, str(checkpoint), str(checkpoint / "adapter"))):
            return True
    if not _mentions(job, (run.id,)):
        # `run: <job name>` means that job's latest run; count it only if that is still this run.
        from runner.runs import RunError, RunStore

        refs = [v for v in _values_of(job, "run") if isinstance(v, str)]
        try:
            if not any(RunStore().get(r).dir == run.dir for r in refs):
                return False
        except RunError:
            return False
    for sel in _values_of(job, "checkpoint"):
        if isinstance(sel, (str, int)):
            with contextlib.suppress(RegistryError):
                if os.path.realpath(select_checkpoint(run, str(sel))) == ck_real:
                    return True
    return False


def job_source(run: Run) -> str | None:
    """The job file a run was started from, as it was given to `runner run`."""
    return next((str(e["source"]) for e in run.events() if e.get("event") == "created" and e.get("source")), None)


QUESTION_KEYS = ("data", "limit", "seed")


def question_selection(job_data: dict[str, Any]) -> dict[str, Any]:
    """What decides an eval job's questions; two jobs with the same selection score the same questions."""
    return {k: job_data.get(k) for k in QUESTION_KEYS}


def _eval_runs(matches: Callable[[Run, dict[str, Any]], bool]) -> list[tuple[Eval, Path]]:
    """Every succeeded `eval` run whose eval.json `matches`, as an Eval (with its job file and question selection)."""
    from runner.runs import RunStore

    out = []
    for r in RunStore().list():
        st = r.status()
        if st.get("kind") != "eval" or st.get("state") != "succeeded" or not (r.dir / "eval.json").is_file():
            continue
        ev = load_json(r.dir / "eval.json")
        if not isinstance(ev, dict) or finite(ev.get("accuracy")) is None:
            continue
        try:
            if not matches(r, ev):
                continue
            job = r.job_data()
        except Exception:  # an unreadable eval run is not ours to judge here
            continue
        correct = predictions_of(ev)
        letters, chance = letter_facts(ev)
        ident = ev.get("eval_set") or ev.get("dataset_hash")
        eval_set = str(ident) if ident else (ids_set_id(list(correct)) if correct else f"run-{r.id}")
        n = ev.get("n") or (len(correct) if correct else None)
        out.append((Eval("eval-run", eval_set, float(ev["accuracy"]), n, f"{r.ref} eval.json", correct,
                         job_file=job_source(r), questions=question_selection(job), letters=letters, chance=chance),
                    r.dir / "eval.json"))
    return out


def _eval_run_evals(run: Run, checkpoint: Path) -> list[tuple[Eval, Path]]:
    return _eval_runs(lambda r, _ev: _eval_targets(run, checkpoint, r))


def version_eval_runs(manifest: dict[str, Any]) -> list[Eval]:
    """`eval` runs of a registry version's weights: its `registry:` ref, or the run checkpoint it was promoted
    from (a version is immutable, so an eval made after its promotion still measures it)."""
    src = manifest.get("source") or {}
    ident = (src.get("run_id"), src.get("checkpoint"))
    if not all(ident):
        return []

    def matches(_r: Run, ev: dict[str, Any]) -> bool:
        t = ev.get("target")
        if not isinstance(t, dict):
            return False
        if t.get("type") == "registry":
            s = t.get("source") or {}
            return (s.get("run_id"), s.get("checkpoint")) == ident
        return t.get("type") == "run" and (t.get("run_id"), t.get("checkpoint")) == ident

    return [e for e, _ in _eval_runs(matches)]


def collect_evals(run: Run, checkpoint: Path, job_data: dict[str, Any]) -> list[tuple[Eval, Path | None]]:
    found: list[tuple[Eval, Path | None]] = []
    v = _val_eval(run, checkpoint, job_data)
    if v is not None:
        found.append((v, None))
    found += _eval_run_evals(run, checkpoint)
    return found
