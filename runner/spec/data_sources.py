"""What a data source may say besides `path`: Hub data sets (`hf`, `config`, `split`, `revision`) and the `columns`
that hold a table's questions; and the checks across those fields (`DataSource` in models.py calls them).

Pure: nothing here imports `datasets` or looks at files, so `runner validate` stays fast.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

HF_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*")  # some text, no control characters
# Files that hold one table, so one split: `split:` names a split of a Hub data set or a save_to_disk folder.
ONE_TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")

def _column_name(v: str) -> str:
    if len(v) > 200 or not _NAME_RE.fullmatch(v):
        raise ValueError(f"{v[:60]!r} is not a column name")
    return v


class ColumnMap(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as models.Section (which this module cannot import)

    question: str = Field("question", description="Column holding the question text.")
    choices: str | list[str] = Field(
        "choices", description="A list column holding the choices, or 2-10 columns holding one choice each "
        "(`[A, B, C, D]`; empty trailing ones are left out)."
    )
    answer: str = Field(
        "answer", description="Column holding the answer: a letter, a 0-based index or the text of the right choice."
    )
    topic: str | None = Field(None, description="Column holding the topic (unset: the source's `topic`).")
    id: str | None = Field(None, description="Column holding a record id (unset: `SOURCE/ROW`).")
    explanation: str | None = Field(None, description="Column holding an explanation of the answer.")
    difficulty: str | None = Field(None, description="Column holding the difficulty (easy, medium, hard).")

    @field_validator("question", "answer", "topic", "id", "explanation", "difficulty")
    @classmethod
    def _column(cls, v: str | None) -> str | None:
        return None if v is None else _column_name(v)

    @field_validator("choices", mode="before")
    @classmethod
    def _choices(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _column_name(v)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError("must be a column (a list column) or a list of 2-10 columns (one choice each)")
        if not 2 <= len(v) <= 10:
            raise ValueError(f"names {len(v)} column{'s' if len(v) != 1 else ''}; a question has 2-10 choices")
        if len(set(v)) != len(v):
            raise ValueError("names a column twice")
        return [_column_name(x) for x in v]


def source_problem(src: Any) -> tuple[str | None, str] | None:
    """(field or None for the source itself, message) of the first thing wrong across a source's fields."""
    if (src.path is None) == (src.hf is None):
        return None, ("give exactly one of `path` (a file, a directory or builtin:NAME) and `hf` (a Hugging Face Hub "
                      "data set id)")
    for key in ("hf", "config", "split", "revision"):
        v = getattr(src, key)
        if v is not None and not _NAME_RE.fullmatch(v):
            return key, f"{v!r} is not a {key} name"
    if src.hf is not None:
        if not HF_ID_RE.fullmatch(src.hf) or ".." in src.hf:
            return "hf", f"{src.hf!r} is not a Hub data set id (`owner/name` or `name`)"
        if src.format not in ("auto", "hf"):
            return "format", f"an `hf` source is read through `datasets`; remove `format: {src.format}`"
        return None
    for key in ("config", "revision"):
        if getattr(src, key) is not None:
            return key, f"`{key}` is for `hf` (Hub) sources; a local copy has no {key}"
    path = str(src.path)
    if path.startswith("builtin:") and (src.columns is not None or src.split is not None):
        return ("columns" if src.columns is not None else "split"), f"{path} is a generated set, not a table"
    if src.columns is not None and src.format not in ("auto", "hf"):
        return "columns", f"`columns` is for tables read through `datasets` (`format: hf`), not `format: {src.format}`"
    if src.split is not None and path.lower().endswith(ONE_TABLE_SUFFIXES):
        return "split", (f"{path} holds one table; `split` names a split of a Hub data set or of a `save_to_disk` "
                         "folder; remove it")
    return None
