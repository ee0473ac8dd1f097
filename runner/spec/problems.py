"""What is wrong with a job file, and where: FILE:LINE:COL marks, problems (errors and warnings), SpecError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Path_ = tuple[str | int, ...]


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
        where = f"{self.mark.file}:{self.mark.line}:{self.mark.col}: {self.level}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """One or more problems with a job file; str() is one line per problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
