"""MCQ records and their importers (canonical JSONL, MMLU CSV, ARC/OpenBookQA/CommonsenseQA, tournament JSON),
deduplication, the stratified train/validation split, and the `prepare` job kind.

Bad rows are never dropped silently: each is reported as `FILE:LINE: reason`. A source with more bad rows than
`data.max_bad_rows` (default 0) fails the job with the whole list; at or under it they are skipped and listed.
Every text field of a record is a string of at most MAX_TEXT_CHARS characters with no C0 control character
other than tab and newline (CR LF and lone CR become newlines), no DEL and no unpaired surrogate.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.files import atomic_write
from runner.workloads.scoring.prompts import LETTERS, strip_choice_prefix

DIFFICULTIES = ("easy", "medium", "hard")
MAX_TEXT_CHARS = 100_000
# C0 controls but tab and newline, DEL, and lone surrogates (a broken `\ud83d` escape; they cannot be written
# back as UTF-8). C1 controls pass: public sets such as MMLU hold them as mojibake of typographic quotes.
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


@dataclass
class MCQ:
    """One multiple-choice question (DESIGN.md's record)."""

    id: str
    question: str
    choices: list[str]
    answer: str  # a letter, "A".."J"
    topic: str = "general"
    source: str = ""
    difficulty: str = "medium"
    explanation: str | None = None
    origin: str = field(default="", compare=False, repr=False)  # "FILE:LINE" it was read from; not written out

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: its deep copy was most of the time `prepare` spent writing.
        d: dict[str, Any] = {"id": self.id, "question": self.question, "choices": list(self.choices),
                             "answer": self.answer, "topic": self.topic, "source": self.source,
                             "difficulty": self.difficulty}
        if self.explanation is not None:
            d["explanation"] = self.explanation
        return d

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], *, default_id: str, topic: str | None = None, source: str = "", origin: str = ""
    ) -> MCQ:
        """Validate a canonical record dict; raise ValueError with a short reason."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        for key in ("topic", "source", "difficulty"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ValueError(f"'{key}' must be a string")
        if d.get("id") is not None and (isinstance(d["id"], bool) or not isinstance(d["id"], (str, int, float))):
            raise ValueError("'id' must be a string or a number")
        question = d.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("missing or empty 'question'")
        choices = d.get("choices")
        if isinstance(choices, dict):  # {"A": "...", "B": "..."}
            choices = [choices[k] for k in sorted(choices)]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError("'choices' must be a list of strings")
        choices = [strip_choice_prefix(c) for c in choices]
        return make_mcq(
            id=str(d.get("id") or default_id),
            question=question,
            choices=choices,
            answer=d.get("answer"),
            topic=d.get("topic") or topic or "general",
            source=d.get("source") or source,
            difficulty=d.get("difficulty") or "medium",
            explanation=d.get("explanation"),
            origin=origin,
        )


def make_mcq(
    *,
    id: str,
    question: str,
    choices: Sequence[str],
    answer: Any,
    topic: str,
    source: str,
    difficulty: str = "medium",
    explanation: Any = None,
    origin: str = "",
) -> MCQ:
    """A checked MCQ: 2-10 non-empty choices, answer a valid letter (or index), known difficulty, clean text."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"needs 2-{len(LETTERS)} choices, got {len(choices)}")
    if explanation is not None and not isinstance(explanation, str):
        raise ValueError("'explanation' must be a string")
    question = _clean_text("question", question)
    choices = [_clean_text(f"choice {i + 1}", c).strip() for i, c in enumerate(choices)]
    explanation = None if explanation is None else _clean_text("explanation", explanation)
    topic, source, id = (_clean_text(n, str(v)) for n, v in (("topic", topic), ("source", source), ("id", id)))
    if not question.strip():
        raise ValueError("empty question")
    if any(not c for c in choices):
        raise ValueError("empty choice")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
        letter = LETTERS[answer]
    elif isinstance(answer, str):
        m = re.match(r"^\s*\(?([A-Ja-j])\)?(?:[\).:]|\s|$)", answer)
        if not m:
            raise ValueError(f"answer {brief(answer)} is not a letter A-{LETTERS[len(choices) - 1]}")
        letter = m.group(1).upper()
    elif answer is None:
        raise ValueError("missing 'answer'")
    else:
        last = LETTERS[len(choices) - 1]
        raise ValueError(f"'answer' must be a letter A-{last} or a 0-based index, got {brief(answer)}")
    if LETTERS.index(letter) >= len(choices):
        raise ValueError(f"answer {letter} but only {len(choices)} choices")
    difficulty = str(difficulty).lower()
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {brief(difficulty)} is not one of {', '.join(DIFFICULTIES)}")
    return MCQ(
        id=id,
        question=question.strip(),
        choices=list(choices),
        answer=letter,
        topic=str(topic),
        source=str(source),
        difficulty=difficulty,
        explanation=explanation or None,
        origin=origin,
    )


def brief(value: Any) -> str:
    """repr() cut to a length that fits an error line."""
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _clean_text(name: str, text: str) -> str:
    """`text` with CR LF and CR as newlines; ValueError if it is too long or holds a control character."""
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters long; at most {MAX_TEXT_CHARS}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _BAD_CHAR.search(text)
    if m and "\ud800" <= m.group() <= "\udfff":
        raise ValueError(
            f"{name} has an unpaired surrogate U+{ord(m.group()):04X} at character {m.start() + 1} (a broken \\u "
            "escape?); remove it"
        )
    if m:
        raise ValueError(
            f"{name} has control character U+{ord(m.group()):04X} at character {m.start() + 1}; remove it "
            "(only tab and newline are allowed)"
        )
    return text


class DataError(Exception):
    """Data that cannot be used; str() is a readable list of the problems."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        shown = self.problems[:50]
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(message + "".join(f"\n  {p}" for p in shown) + more)


# --- importers: each reads one file and appends to an ImportResult -------------------------------------


# --- dedupe and split ----------------------------------------------------------------------------------


# --- files ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: Iterable[MCQ]) -> None:
    buf = io.StringIO()
    for r in records:
        buf.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    atomic_write(path, buf.getvalue())


def counts(records: Sequence[MCQ]) -> dict[str, Any]:
    return {
        "total": len(records),
        "by_topic": dict(sorted(Counter(r.topic for r in records).items())),
        "by_source": dict(sorted(Counter(r.source for r in records).items())),
        "by_difficulty": {d: sum(1 for r in records if r.difficulty == d) for d in DIFFICULTIES},
    }


# --- the `prepare` job kind ----------------------------------------------------------------------------


