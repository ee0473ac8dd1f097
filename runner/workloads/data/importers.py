"""Importers: JSONL, MMLU CSV, ARC / OpenBookQA / CommonsenseQA JSONL, tournament JSON, BIG-bench tasks
(bigbench.py) and tables read with `datasets` (tables.py) -> MCQ records, each problem reported as FILE:LINE: reason.

A bad record is a problem (skipped up to `data.max_bad_rows`); a file that cannot be read as data at all (not
UTF-8, a line over MAX_LINE_BYTES in a CSV, not a regular file) raises DataError naming FILE:LINE. Files are read
as UTF-8 with an optional byte order mark; JSON nested deeper than MAX_JSON_DEPTH is refused before parsing.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from runner.spec.models import DataSource
from runner.workloads.data.bigbench import import_bigbench, looks_like_task, subtask_files
from runner.workloads.data.builtin import generate as generate_builtin
from runner.workloads.data.reading import (  # MAX_JSON_DEPTH and MAX_LINE_BYTES: importers' documented limits
    MAX_JSON_DEPTH,  # noqa: F401
    MAX_LINE_BYTES,  # noqa: F401
    ImportResult,
    json_document,
    json_value,
    no_value,
    read_lines,
    reason,
)
from runner.workloads.data.records import MCQ, DataError, brief, make_mcq
from runner.workloads.data.tables import TABLE_SUFFIXES, import_hub, import_local, is_saved_dataset

DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


# --- importers: each reads one file and appends to an ImportResult ------------------------------------


def _each_json_line(path: Path, out: ImportResult, build: Callable[[Any, int], MCQ]) -> None:
    seen = False
    for lineno, line in read_lines(path):
        seen = seen or line is None or bool(line.strip())
        if line is None:
            out.problems.append(f"{path}:{lineno}: line longer than 1 MiB; each record is one JSON object on a line")
            continue
        if not line.strip():
            continue
        try:
            out.records.append(build(json_value(line), lineno))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            out.problems.append(f"{path}:{lineno}: {reason(e)}")
    if not seen:
        out.problems.append(f"{path}:1: the file is empty; expected one JSON record per line")


def _import_jsonl(path: Path, out: ImportResult, topic: str | None) -> None:
    def build(d: Any, lineno: int) -> MCQ:
        return MCQ.from_dict(
            d, default_id=f"{path.stem}/{lineno}", topic=topic, source=path.stem, origin=f"{path}:{lineno}"
        )

    _each_json_line(path, out, build)


def _mmlu_topic(path: Path) -> str:
    return re.sub(r"_(val|dev|test|train|auxiliary_train)$", "", path.stem)


def _csv_lines(path: Path) -> Iterator[str]:
    for lineno, line in read_lines(path):
        if line is None:
            raise DataError(
                f"{path}:{lineno}: line longer than 1 MiB; is this an MMLU CSV file (question,A,B,C,D,answer)?"
            )
        yield line


def _csv_rows(path: Path, out: ImportResult) -> list[tuple[int, list[str]]]:
    """(starting line, fields) of each non-blank CSV record; malformed ones become problems."""
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(_csv_lines(path))
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            reason = "a field over 131072 characters (an unclosed quote?)" if "field limit" in str(e) else str(e)
            out.problems.append(f"{path}:{start}: malformed CSV: {reason}")
            start = reader.line_num + 1
            continue
        lineno, start = start, reader.line_num + 1
        if row and any(c.strip() for c in row):
            rows.append((lineno, row))
    return rows


def _is_header(row: list[str]) -> bool:
    return row[0].strip().lower() in ("question", "prompt", "input") and row[-1].strip().lower() in (
        "answer", "answerkey", "target", "label")


def _import_mmlu_csv(path: Path, out: ImportResult, topic: str | None) -> None:
    topic = topic or _mmlu_topic(path)
    split = path.stem[len(_mmlu_topic(path)) + 1 :] or "data"
    problems_before = len(out.problems)
    rows = _csv_rows(path, out)
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
        if not rows and len(out.problems) == problems_before:
            out.problems.append(f"{path}:1: the file holds only a header row, no questions")
            return
    if not rows and len(out.problems) == problems_before:
        out.problems.append(f"{path}:1: the file is empty; expected rows of question,A,B,C,D,answer")
        return
    # an unquoted comma shifts every field after it: rows must all be as wide as most of the file's rows
    width = Counter(len(r) for _, r in rows if len(r) >= 3).most_common(1)
    for i, (lineno, row) in enumerate(rows, 1):
        if len(row) < 3:
            out.problems.append(f"{path}:{lineno}: expected question,choices...,answer; got {len(row)} field(s)")
            continue
        if len(row) != width[0][0]:
            out.problems.append(
                f"{path}:{lineno}: {len(row)} fields where the file's rows have {width[0][0]} (question, "
                f"{width[0][0] - 2} choices, answer); quote fields that contain commas"
            )
            continue
        try:
            out.records.append(
                make_mcq(
                    id=f"mmlu/{topic}/{split}/{i}",
                    question=row[0],
                    choices=row[1:-1],
                    answer=row[-1].strip(),
                    topic=topic,
                    source="mmlu",
                    origin=f"{path}:{lineno}",
                )
            )
        except ValueError as e:
            out.problems.append(f"{path}:{lineno}: {e}")


def _arc_like_source(path: Path, d: dict[str, Any]) -> str:
    if "question_concept" in d or (isinstance(d.get("question"), dict) and "question_concept" in d["question"]):
        return "commonsenseqa"
    if "question_stem" in d or "fact1" in d or "openbook" in path.name.lower():
        return "openbookqa"
    return "arc"


def _arc_like(d: dict[str, Any], path: Path, lineno: int, topic: str | None) -> MCQ:
    """ARC / OpenBookQA / CommonsenseQA, both the original (`question.stem`) and the HF-datasets layout."""
    q = d.get("question")
    if isinstance(q, dict):
        stem, raw = q.get("stem"), q.get("choices")
    else:
        stem, raw = d.get("question_stem", q), d.get("choices")
    if isinstance(raw, dict):  # HF layout: {"text": [...], "label": [...]}
        raw = [{"text": t, "label": lab} for t, lab in zip(raw.get("text", []), raw.get("label", []), strict=False)]
    if not isinstance(stem, str) or not isinstance(raw, list) or not raw:
        raise ValueError("expected question stem and choices (ARC/OpenBookQA/CommonsenseQA layout)")
    labels = [str(c.get("label", "")) for c in raw]
    texts = [str(c.get("text", "")) for c in raw]
    key = str(d.get("answerKey", "")).strip()
    if key not in labels:
        raise ValueError(f"answerKey {brief(key)} is not one of the choice labels {brief(labels)}")
    source = _arc_like_source(path, d)
    name = path.name.lower()
    difficulty = "hard" if "challenge" in name else "easy" if "easy" in name else "medium"
    return make_mcq(
        id=str(d.get("id") or f"{path.stem}/{lineno}"),
        question=stem,
        choices=texts,
        answer=labels.index(key),
        topic=topic or source,
        source=source,
        difficulty=difficulty,
        explanation=d.get("fact1"),
        origin=f"{path}:{lineno}",
    )


def _import_arc_like(path: Path, out: ImportResult, topic: str | None) -> None:
    _each_json_line(path, out, lambda d, lineno: _arc_like(d, path, lineno, topic))


def _import_tournament(path: Path, out: ImportResult, topic: str | None) -> None:
    data, starts = json_document(path, out, "a JSON list of questions")
    if no_value(data):
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if lists else [data]
    if not isinstance(data, list):
        out.problems.append(f"{path}:1: expected a JSON list of questions")
        return
    if not data:
        out.problems.append(f"{path}:1: the list holds no questions")
        return
    for i, d in enumerate(data):
        lineno = starts[i] if i < len(starts) else 1
        try:
            out.records.append(
                MCQ.from_dict(d, default_id=f"{path.stem}/{i + 1}", topic=topic, source=path.stem or "tournament",
                              origin=f"{path}:{lineno}")
            )
        except (ValueError, KeyError) as e:
            out.problems.append(f"{path}:{lineno}: {reason(e)}")


IMPORTERS = {
    "jsonl": _import_jsonl,
    "mmlu_csv": _import_mmlu_csv,
    "arc": _import_arc_like,
    "openbookqa": _import_arc_like,
    "commonsenseqa": _import_arc_like,
    "tournament": _import_tournament,
    "bigbench": import_bigbench,
}


def detect_format(path: Path) -> str:
    """Pick an importer from the extension and, for JSON Lines and JSON, the content."""
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES or is_saved_dataset(path):
        return "hf"
    if suffix == ".csv":
        return "mmlu_csv"
    if suffix == ".json":
        return "bigbench" if looks_like_task(path) else "tournament"
    if suffix == ".jsonl":
        for _, line in read_lines(path):
            if line is None or not line.strip():
                continue
            try:
                d = json_value(line)
            except ValueError:
                return "jsonl"  # the importer reports the line
            if isinstance(d, dict) and (
                isinstance(d.get("question"), dict) or "question_stem" in d or isinstance(d.get("choices"), dict)
            ):
                return _arc_like_source(path, d)
            return "jsonl"
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the format from the extension {suffix!r}; set `format:`")


def _files_of(path: Path, tables: bool) -> list[Path]:
    """The data files of a source path; with `tables`, also parquet and arrow files, and each save_to_disk folder
    as one entry (the files inside it are not data files of their own)."""
    if not path.is_dir() or (tables and is_saved_dataset(path)):
        return [path]
    extensions = DATA_EXTENSIONS + (TABLE_SUFFIXES if tables else ())
    entries = list(path.rglob("*"))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith(".")]
    if not tables:
        return sorted(files)
    saved = {p.parent for p in entries if p.name in ("dataset_dict.json", "state.json") and is_saved_dataset(p.parent)}
    roots = {d for d in saved if not saved.intersection(d.parents)}
    return sorted([f for f in files if not roots.intersection(f.parents)] + list(roots))


def _builtin(src: DataSource, out: ImportResult) -> ImportResult:
    path = str(src.path)
    name = path.removeprefix("builtin:")
    try:
        dicts = generate_builtin(name)
    except ValueError as e:
        raise DataError(f"data source {path!r}: {e}") from None
    for i, d in enumerate(dicts):
        try:
            out.records.append(MCQ.from_dict(d, default_id=f"{name}/{i}", topic=src.topic, origin=f"{path}:{i + 1}"))
        except ValueError as e:
            out.problems.append(f"{path}:{i + 1}: {e}")
    return out


def import_source(src: DataSource, base_dir: Path | None = None) -> ImportResult:
    """Read one source (file, directory, builtin or Hub data set) without filtering; bad records collected as
    problems, files that cannot be read at all raised as DataError."""
    out = ImportResult()
    if src.hf is not None:
        import_hub(src, out)
        return out
    if str(src.path).startswith("builtin:"):
        return _builtin(src, out)
    path = Path(os.path.expandvars(str(src.path))).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise DataError(f"data source {src.path!r}: no such file or directory (looked at {path.resolve()})")
    if not path.is_dir() and not path.is_file():
        raise DataError(f"data source {src.path!r}: {path} is not a regular file or a directory")
    tables = src.format in ("auto", "hf")
    files = _files_of(path, tables)
    if path.is_file() and (src.format == "bigbench" or (src.format == "auto" and looks_like_task(path))):
        files += subtask_files(path)  # a task made of subtasks: their task.json files hold the examples
    if not files:
        exts = DATA_EXTENSIONS + (TABLE_SUFFIXES if tables else ())
        raise DataError(f"data source {src.path!r}: the directory holds no {', '.join(exts)} files")
    for f in files:
        fmt: str = src.format
        if fmt == "auto":
            try:
                fmt = "hf" if src.columns is not None else detect_format(f)
            except ValueError as e:
                out.problems.append(f"{f}:1: {e}")
                continue
        if fmt == "hf":
            import_local(f, out, src)  # a save_to_disk folder adds the files inside it
            out.files += [f] if f.is_file() else []
            continue
        IMPORTERS[fmt](f, out, src.topic)
        out.files.append(f)
    return out


def read_jsonl(path: Path) -> list[MCQ]:
    res = ImportResult()
    _import_jsonl(path, res, None)
    if res.problems:
        raise DataError(f"{path}: bad records", res.problems)
    return res.records
