"""BIG-bench JSON tasks (`task.json`) -> MCQ records: each example's `input` is the question, the keys of its
`target_scores` the choices, and the one choice with the highest score the answer.

A task made of subtasks (a `task.json` without `examples` beside folders that hold one each) is read as its
subtasks. Examples that cannot be questions (generative ones, more than 10 choices, no single best choice) are
problems reported as FILE:LINE of the example, like a bad row of any other importer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from runner.workloads.data.reading import ImportResult, json_document, no_value
from runner.workloads.data.records import MCQ, brief, make_mcq
from runner.workloads.scoring.prompts import LETTERS

_PEEK_BYTES = 1 << 20
# Keys every BIG-bench task file has besides `examples`; a tournament file has none of them.
_TASK_KEYS = ('"canary"', '"preferred_score"', '"metrics"', '"keywords"')


def subtask_files(path: Path) -> list[Path]:
    """The subtasks' task.json files of a BIG-bench task made of subtasks (none for any other file)."""
    if path.name != "task.json":
        return []
    return sorted(p for p in path.parent.glob("*/task.json") if p.is_file())


def looks_like_task(path: Path) -> bool:
    """Whether a .json file is a BIG-bench task: examples with `target_scores`, or the task.json of subtasks."""
    try:
        with path.open("rb") as f:
            head = f.read(_PEEK_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False  # the importer reports it
    if not head.lstrip("\ufeff \t\r\n").startswith("{"):
        return False
    if '"target_scores"' in head or ('"examples"' in head and any(k in head for k in _TASK_KEYS)):
        return True
    return '"examples"' not in head and any(k in head for k in _TASK_KEYS) and bool(subtask_files(path))


def _task_name(path: Path, data: dict[str, Any]) -> str:
    name = data.get("name") if isinstance(data.get("name"), str) and data["name"].strip() else path.parent.name
    if (path.parent.parent / "task.json").is_file():  # a subtask: named within its task
        name = f"{path.parent.parent.name}/{name}"
    return str(name).strip() or path.stem


def _example(ex: Any, *, task: str, number: int, topic: str | None, origin: str) -> MCQ:
    if not isinstance(ex, dict):
        raise ValueError("an example must be a JSON object with `input` and `target_scores`")
    question = ex.get("input")
    if not isinstance(question, str):
        raise ValueError("missing or non-text `input`")
    scores = ex.get("target_scores")
    if scores is None:
        if "target" in ex:
            raise ValueError("no `target_scores`: a generative example (only `target`); only multiple-choice "
                             "examples become questions")
        raise ValueError("missing `target_scores`")
    if not isinstance(scores, dict) or not scores:
        raise ValueError("`target_scores` must be an object mapping each choice to its score")
    for choice, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"the score of choice {brief(choice)} is {brief(score)}, not a number")
    if len(scores) > len(LETTERS):
        raise ValueError(f"{len(scores)} choices; a question has at most {len(LETTERS)} (A-{LETTERS[-1]})")
    best = max(scores.values())
    top = [i for i, s in enumerate(scores.values()) if s == best]
    if len(top) != 1:
        named = ", ".join(LETTERS[i] if i < len(LETTERS) else str(i) for i in top)
        raise ValueError(f"no single best choice: {len(top)} choices ({named}) share the top score {best}")
    return make_mcq(id=f"bigbench/{task}/{number}", question=question, choices=list(scores), answer=top[0],
                    topic=topic or task, source="bigbench", origin=origin)


def import_bigbench(path: Path, out: ImportResult, topic: str | None) -> None:
    """Append the questions of one BIG-bench task.json to `out`, each bad example a FILE:LINE problem."""
    data, starts = json_document(path, out, "a BIG-bench task (a JSON object with examples)", key="examples")
    if no_value(data):
        return
    if not isinstance(data, dict):
        out.problems.append(f"{path}:1: expected a BIG-bench task: a JSON object with `examples`")
        return
    examples = data.get("examples")
    if examples is None:
        if not subtask_files(path):  # with subtasks, each subtask's own task.json holds the examples
            out.problems.append(f"{path}:1: a BIG-bench task without `examples` (and no subtask folders)")
        return
    if not isinstance(examples, list) or not examples:
        out.problems.append(f"{path}:{starts[0] if starts else 1}: `examples` must be a non-empty list")
        return
    task = _task_name(path, data)
    for i, ex in enumerate(examples):
        lineno = starts[i] if i < len(starts) else 1
        try:
            out.records.append(_example(ex, task=task, number=i + 1, topic=topic, origin=f"{path}:{lineno}"))
        except ValueError as e:
            out.problems.append(f"{path}:{lineno}: {e}")
