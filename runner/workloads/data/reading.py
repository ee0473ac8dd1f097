"""Reading data files safely: UTF-8 text (an optional byte order mark; wide encodings named), lines of bounded
length, JSON of bounded size and nesting with the line each list item starts on, and short reasons for errors.

Shared by every importer, so a file that cannot be read as data fails the same way whatever its format.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.workloads.data.records import MCQ, DataError

# Python refuses int("9" * N) past this many digits (a limit since 3.10.7; 4300 is its default).
MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)()

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
    details: dict[str, Any] = field(default_factory=dict)  # facts for the manifest beyond files (a Hub set's id)


def decode(path: Path, data: bytes, first_line: int = 1) -> str:
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


def open_bytes(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line, the text None for a line over MAX_LINE_BYTES (read past, never held)."""
    with open_bytes(path) as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES)
                yield lineno, None
                continue
            yield lineno, decode(path, raw, lineno)


def read_text(path: Path) -> str:
    with open_bytes(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise DataError(f"{path}:1: larger than {MAX_JSON_BYTES >> 20} MiB; split it or convert it to JSON Lines")
    return decode(path, data)


TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels; a question needs 3 at most"
_JSON_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[\[\]{},\n]')


def json_layout(text: str, key: str | None = None) -> tuple[list[int], int | None]:
    """Lines where the items of the question list start (a top-level array, or the first array in a top-level
    object; with `key`, the array under that key of a top-level object) and the line where nesting first passes
    MAX_JSON_DEPTH (None if it never does)."""
    starts: list[int] = []
    top = re.match(r"\s*(.?)", text).group(1)  # type: ignore[union-attr]
    items_at = 1 if top == "[" and key is None else 2 if top == "{" else 0  # the depth inside the question list
    depth, line, in_items, done, pending = 0, 1, False, False, False
    key_token, prev = None if key is None else json.dumps(key), ""
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
            continue
        tok_before, prev = prev, tok  # the colon is not a token: a key string comes right before its value
        if pending and tok not in ",]}":
            starts[-1], pending = line, False
        if tok in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return starts, line
            if tok == "[" and depth == items_at and not done and key_token in (None, tok_before):
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
    _, deep = json_layout(text)
    return None if deep is None else TOO_DEEP


def json_value(text: str) -> Any:
    """json.loads, with every failure (syntax, nesting, numbers too long to convert) a ValueError."""
    problem = _nesting_problem(text)
    if problem:
        raise ValueError(problem)
    return json.loads(text)


def reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg}"
    if isinstance(e, KeyError):
        return f"missing field {e}"
    if "integer string conversion" in str(e):
        return f"invalid JSON: a number of more than {MAX_DIGITS} digits"
    return str(e)


_NO_VALUE = object()


def json_document(path: Path, out: ImportResult, expected: str, key: str | None = None) -> tuple[Any, list[int]]:
    """A whole-file JSON document and the lines its items start on; `(_NO_VALUE, [])` after appending the one
    FILE:LINE problem that stops it (empty, nested too deep, invalid JSON, a number too long to convert).
    `expected` says what the file should hold, for the empty-file message."""
    text = read_text(path)
    if not text.strip():
        out.problems.append(f"{path}:1: the file is empty; expected {expected}")
        return _NO_VALUE, []
    starts, deep = json_layout(text, key=key)
    if deep is not None:
        out.problems.append(f"{path}:{deep}: {TOO_DEEP}")
        return _NO_VALUE, []
    try:
        return json.loads(text), starts
    except json.JSONDecodeError as e:
        out.problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg}")
    except ValueError as e:  # an integer too long to convert
        long_number = re.search(rf"\d{{{MAX_DIGITS + 1},}}", text)
        line = text.count("\n", 0, long_number.start()) + 1 if long_number else 1
        out.problems.append(f"{path}:{line}: {reason(e)}")
    return _NO_VALUE, []


def no_value(data: Any) -> bool:
    """Whether `json_document` gave up on the file (its problem is already reported)."""
    return data is _NO_VALUE
