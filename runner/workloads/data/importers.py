"""Importers: JSONL, MMLU CSV, ARC / OpenBookQA / CommonsenseQA JSONL and tournament JSON -> MCQ records,
each problem reported as FILE:LINE: reason.

A bad record is a problem (skipped up to `data.max_bad_rows`); a file that cannot be read as data at all (not
UTF-8, a line over MAX_LINE_BYTES in a CSV, not a regular file) raises DataError naming FILE:LINE. Files are read
as UTF-8 with an optional byte order mark; JSON nested deeper than MAX_JSON_DEPTH is refused before parsing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.spec.models import DataSource
from runner.workloads.data.builtin import generate as generate_builtin
from runner.workloads.data.records import MCQ, DataError, brief, make_mcq

# Python refuses int("9" * N) past this many digits (a limit since 3.10.7; 4300 is its default).
_MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)()

DATA_EXTENSIONS = (".jsonl", ".json", ".csv")
MAX_LINE_BYTES = 1 << 20
MAX_JSON_BYTES = 256 << 20
MAX_JSON_DEPTH = 32
_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


@dataclass
class ImportResult:
    records: list[MCQ] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: reason"
    files: list[Path] = field(default_factory=list)


# --- reading text safely ---------------------------------------------------------------------------------


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """UTF-8 text of `data` (which starts on `first_line`); DataError naming the line of the first bad byte."""
    if first_line == 1:
        for bom, name in _WIDE_BOMS:
            if data.startswith(bom):
                raise DataError(f"{path}:1: the file is {name} text; save it as UTF-8")
        data = data.removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); save the file as UTF-8"
        ) from None


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line, the text None for a line over MAX_LINE_BYTES (read past, never held)."""
    with _open(path) as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                yield lineno, None
                continue
            yield lineno, _decode(path, raw, lineno)


def _read_text(path: Path) -> str:
    with _open(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise DataError(f"{path}:1: larger than {MAX_JSON_BYTES >> 20} MiB; split it or convert it to JSON Lines")
    return _decode(path, data)


_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels; a question needs 3 at most"
_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{},\n]')


def _json_layout(text: str) -> tuple[list[int], int | None]:
    """Lines where the items of the question list start (a top-level array, or the first array in a top-level
    object) and the line where nesting first passes MAX_JSON_DEPTH (None if it never does)."""
    starts: list[int] = []
    top = re.match(r"\s*(.?)", text).group(1)  # type: ignore[union-attr]
    items_at = 1 if top == "[" else 2 if top == "{" else 0  # the depth inside the question list
    depth, line, in_items, done, pending = 0, 1, False, False, False
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
            continue
        if pending and tok not in ",]}":
            starts[-1], pending = line, False
        if tok in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return starts, line
            if tok == "[" and depth == items_at and not done:
                in_items, pending = True, True
                starts.append(line)
        elif tok in "]}":
            if in_items and depth == items_at:
                in_items, done, pending = False, True, False  # only the first list holds the questions
            depth -= 1
        elif tok == "," and in_items and depth == items_at:
            starts.append(line)
            pending = True
    return starts, None


def _nesting_problem(text: str) -> str | None:
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    _, deep = _json_layout(text)
    return None if deep is None else _TOO_DEEP


def _json_value(text: str) -> Any:
    """json.loads, with every failure (syntax, nesting, numbers too long to convert) a ValueError."""
    problem = _nesting_problem(text)
    if problem:
        raise ValueError(problem)
    return json.loads(text)


# --- importers: each reads one file and appends to an ImportResult ------------------------------------


def _each_json_line(path: Path, out: ImportResult, build: Callable[[Any, int], MCQ]) -> None:
    seen = False
    for lineno, line in _lines(path):
        seen = seen or line is None or bool(line.strip())
        if line is None:
            out.problems.append(f"{path}:{lineno}: line longer than 1 MiB; each record is one JSON object on a line")
            continue
        if not line.strip():
            continue
        try:
            out.records.append(build(_json_value(line), lineno))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            out.problems.append(f"{path}:{lineno}: {_reason(e)}")
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
    for lineno, line in _lines(path):
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
    text = _read_text(path)
    if not text.strip():
        out.problems.append(f"{path}:1: the file is empty; expected a JSON list of questions")
        return
    starts, deep = _json_layout(text)
    if deep is not None:
        out.problems.append(f"{path}:{deep}: {_TOO_DEEP}")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        out.problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg}")
        return
    except ValueError as e:  # an integer too long to convert
        long_number = re.search(rf"\d{{{_MAX_DIGITS + 1},}}", text)
        line = text.count("\n", 0, long_number.start()) + 1 if long_number else 1
        out.problems.append(f"{path}:{line}: {_reason(e)}")
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
            out.problems.append(f"{path}:{lineno}: {_reason(e)}")


IMPORTERS = {
    "jsonl": _import_jsonl,
    "mmlu_csv": _import_mmlu_csv,
    "arc": _import_arc_like,
    "openbookqa": _import_arc_like,
    "commonsenseqa": _import_arc_like,
    "tournament": _import_tournament,
}


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg}"
    if isinstance(e, KeyError):
        return f"missing field {e}"
    if "integer string conversion" in str(e):
        return f"invalid JSON: a number of more than {_MAX_DIGITS} digits"
    return str(e)


def detect_format(path: Path) -> str:
    """Pick an importer from the extension and, for JSON Lines, the first record's keys."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "mmlu_csv"
    if suffix == ".json":
        return "tournament"
    if suffix == ".jsonl":
        for _, line in _lines(path):
            if line is None or not line.strip():
                continue
            try:
                d = _json_value(line)
            except ValueError:
                return "jsonl"  # the importer reports the line
            if isinstance(d, dict) and (
                isinstance(d.get("question"), dict) or "question_stem" in d or isinstance(d.get("choices"), dict)
            ):
                return _arc_like_source(path, d)
            return "jsonl"
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the format from the extension {suffix!r}; set `format:`")


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS and not p.name.startswith(".")
        )
    return [path]


def import_source(src: DataSource, base_dir: Path | None = None) -> ImportResult:
    """Read one source (file, directory or builtin) without filtering; bad records collected as problems, files
    that cannot be read at all raised as DataError."""
    out = ImportResult()
    if src.path.startswith("builtin:"):
        name = src.path.removeprefix("builtin:")
        try:
            dicts = generate_builtin(name)
        except ValueError as e:
            raise DataError(f"data source {src.path!r}: {e}") from None
        for i, d in enumerate(dicts):
            try:
                out.records.append(
                    MCQ.from_dict(d, default_id=f"{name}/{i}", topic=src.topic, origin=f"{src.path}:{i + 1}")
                )
            except ValueError as e:
                out.problems.append(f"{src.path}:{i + 1}: {e}")
        return out
    path = Path(os.path.expandvars(src.path)).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise DataError(f"data source {src.path!r}: no such file or directory (looked at {path.resolve()})")
    if not path.is_dir() and not path.is_file():
        raise DataError(f"data source {src.path!r}: {path} is not a regular file or a directory")
    files = _files_of(path)
    if not files:
        raise DataError(f"data source {src.path!r}: the directory holds no {', '.join(DATA_EXTENSIONS)} files")
    for f in files:
        fmt = src.format
        if fmt == "auto":
            try:
                fmt = detect_format(f)
            except ValueError as e:
                out.problems.append(f"{f}:1: {e}")
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
