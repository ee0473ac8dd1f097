"""What is wrong with a job file, and where: FILE:LINE:COL marks, problems (errors and warnings), SpecError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Path_ = tuple[str | int, ...]

SHOWN_CHARS = 80
PATH_CHARS = 200


def printable(text: str) -> str:
    """`text` with what would break a one-line report escaped: control characters, line and paragraph
    separators, bidirectional overrides, lone surrogates (which cannot even be written to a UTF-8 terminal)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for a message, cut to about `limit` characters: a job file's values can be any size."""
    if isinstance(value, int) and value.bit_length() > 14_000:  # str() refuses more than 4,300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass(frozen=True)
class Mark:
    file: str
    line: int  # 1-based
    col: int  # 1-based


@dataclass(frozen=True)
class Problem:
    mark: Mark
    path: str
    message: str
    level: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{printable(self.mark.file)}:{self.mark.line}:{self.mark.col}: {self.level}"
        # A key with spaces at either end would run into the separators; quoted, it is plainly one key.
        path = printable(self.path if self.path == self.path.strip() else repr(self.path))
        if len(path) > PATH_CHARS:
            path = path[:PATH_CHARS] + "..."
        message = printable(self.message)
        return f"{where}: {path}: {message}" if path else f"{where}: {message}"


class SpecError(Exception):
    """One or more problems with a job file; str() is one line per problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
