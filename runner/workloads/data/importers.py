"""Importers: JSONL, MMLU CSV, ARC / OpenBookQA / CommonsenseQA JSONL and tournament JSON -> MCQ records,
each problem reported as FILE:LINE: reason."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.spec.models import DataSource
from runner.workloads.data.builtin import generate as generate_builtin
from runner.workloads.data.records import MCQ, DataError, make_mcq

DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


@dataclass
class ImportResult:
    records: list[MCQ] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: reason"
    files: list[Path] = field(default_factory=list)


def _import_jsonl(path: Path, out: ImportResult, topic: str | None) -> None:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.records.append(MCQ.from_dict(d, default_id=f"{path.stem}/{lineno}", topic=topic, source=path.stem))
            except (ValueError, KeyError) as e:
                out.problems.append(f"{path}:{lineno}: {_reason(e)}")


def _mmlu_topic(path: Path) -> str:
    return re.sub(r"_(val|dev|test|train|auxiliary_train)$", "", path.stem)


def _import_mmlu_csv(path: Path, out: ImportResult, topic: str | None) -> None:
    topic = topic or _mmlu_topic(path)
    split = path.stem[len(_mmlu_topic(path)) + 1 :] or "data"
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        start = 1
        i = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                out.problems.append(f"{path}:{start}: malformed CSV: {e}")
                start = reader.line_num + 1
                continue
            lineno, start = start, reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            i += 1
            if len(row) < 3:
                out.problems.append(f"{path}:{lineno}: expected question,choices...,answer; got {len(row)} field(s)")
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
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
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
    )


def _import_arc_like(path: Path, out: ImportResult, topic: str | None) -> None:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.records.append(_arc_like(json.loads(line), path, lineno, topic))
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                out.problems.append(f"{path}:{lineno}: {_reason(e)}")


def _json_line_of_items(text: str) -> list[int]:
    """1-based line where each top-level item of a JSON array (or of the first array in an object) starts."""
    lines: list[int] = []
    depth, line, in_str, esc = 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            esc = not esc and ch == "\\"
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
            esc = False
        elif ch in "[{":
            depth += 1
            if ch == "{" and depth == 2:
                lines.append(line)
        elif ch in "]}":
            depth -= 1
    return lines


def _import_tournament(path: Path, out: ImportResult, topic: str | None) -> None:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        out.problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg}")
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if lists else [data]
    if not isinstance(data, list):
        out.problems.append(f"{path}:1: expected a JSON list of questions")
        return
    starts = _json_line_of_items(text)
    for i, d in enumerate(data):
        lineno = starts[i] if i < len(starts) else 1
        try:
            out.records.append(
                MCQ.from_dict(d, default_id=f"{path.stem}/{i + 1}", topic=topic, source=path.stem or "tournament")
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
    return str(e)


def detect_format(path: Path) -> str:
    """Pick an importer from the extension and, for JSON Lines, the first record's keys."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "mmlu_csv"
    if suffix == ".json":
        return "tournament"
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        d = json.loads(line)
                    except json.JSONDecodeError:
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
    """Read one source (file, directory or builtin) without filtering; problems collected, never raised."""
    out = ImportResult()
    if src.path.startswith("builtin:"):
        name = src.path.removeprefix("builtin:")
        try:
            dicts = generate_builtin(name)
        except ValueError as e:
            raise DataError(f"data source {src.path!r}: {e}") from None
        for i, d in enumerate(dicts):
            try:
                out.records.append(MCQ.from_dict(d, default_id=f"{name}/{i}", topic=src.topic))
            except ValueError as e:
                out.problems.append(f"{src.path}:{i + 1}: {e}")
        return out
    path = Path(os.path.expandvars(src.path)).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise DataError(f"data source {src.path!r}: no such file or directory (looked at {path.resolve()})")
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
