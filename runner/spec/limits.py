"""Bounds on a job file, checked before and while it is parsed, so hostile input is refused in milliseconds, and
the YAML reader that names the line of any value it cannot build."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor, SafeConstructor
from ruamel.yaml.nodes import MappingNode, SequenceNode
from ruamel.yaml.reader import Reader

from runner.spec.problems import Mark, Problem, SpecError, shown

# Bounds on a job file, so hostile input is refused quickly: its size, how deep it nests, and how many values it
# holds once YAML aliases are expanded (a few hundred bytes of nested aliases can stand for billions). The
# round-trip YAML parser reads about 30 KB a second on a busy machine, so the size bound is what keeps every
# answer under a second; the largest shipped job is about 1 KB.
MAX_FILE_BYTES = 16 << 10


MAX_DEPTH = 64


MAX_VALUES = 20_000


MAX_ENTRIES = 2_000  # keys and items as written (a shipped job has under a hundred)


def resolved(path: Path) -> Path:
    """`path` made absolute with symlinks resolved where they can be (a loop or a NUL byte is left for the read
    to report)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(path))


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be a job file (missing, a directory, a device or pipe, too big), or None."""
    try:
        st = path.stat()
    except ValueError:  # a NUL byte, or a lone surrogate that has no bytes to name a file with
        return "has a NUL byte in its name" if "\0" in str(path) else "is not a valid file name"
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not found"
        return f"cannot be read: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory; name a job file (.yaml) in it"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a device, pipe or socket); a job file is a YAML file"
    if st.st_size > MAX_FILE_BYTES:
        return _too_large(st.st_size)
    return None


def _too_large(size: int) -> str:
    return (f"is {size:,} bytes; a job file may be at most {MAX_FILE_BYTES:,} (data belongs in data files, "
            "long lists in a file the job names)")


def read_text(path: Path, shown: str) -> str:
    """The text of a job file: a regular file of at most MAX_FILE_BYTES, in UTF-8 (a leading BOM dropped)."""
    at = Mark(shown, 1, 1)
    why = file_problem(path)
    if why == "not found":
        raise SpecError([Problem(at, "", "file not found")])
    if why is not None:
        raise SpecError([Problem(at, "", f"the file {why}")])
    try:
        # Non-blocking, so a file swapped for a pipe after the check above cannot hang the read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecError([Problem(at, "", f"the file cannot be read: {e.strerror or e}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([Problem(at, "", f"the file {_too_large(len(raw))}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        col = len(raw[start:e.start].decode("utf-8", "replace")) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError([Problem(Mark(shown, line, col), "", f"not UTF-8 text (byte 0x{raw[e.start]:02x}); save "
                                                             "the file as UTF-8")]) from None
    return text[1:] if text.startswith("\ufeff") else text


def _shape(text: str) -> tuple[int, int, int, int]:
    """(deepest nesting of flow brackets, its line, how many keys and items the text writes, the line where
    they pass MAX_ENTRIES), skipping quoted text and comments. The parser recurses per bracket level (seconds on
    thousands) and spends about a millisecond per key or item on a busy machine, so both are bounded first."""
    depth = deepest = entries = 0
    line = at = over = 1
    quote = ""
    prev = "\n"
    in_comment = False
    for ch in text:
        if not (quote or in_comment) and ((ch in " \t\n" and prev in ":-?") or ch in "[{,"):
            entries += 1
            if entries == MAX_ENTRIES + 1:
                over = line
        if ch == "\n":
            line += 1
            in_comment = False
        elif in_comment:
            pass
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'" and prev in " \t[{,:\n":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            in_comment = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, line
        elif ch in "]}":
            depth = max(0, depth - 1)
        prev = ch
    return deepest, at, entries, over


def lone_surrogate(text: str) -> str | None:
    """Why `text` is not text, when a YAML escape (\\ud800) made half of a UTF-16 pair: nothing can write it."""
    m = _SURROGATE.search(text)
    return None if m is None else (f"holds {m[0]!r}, half of a UTF-16 surrogate pair and not a character; write "
                                   "the character itself")


_SURROGATE = re.compile("[\ud800-\udfff]")


def value_problem(value: Any, depth: int = 0, count: list[int] | None = None) -> str | None:
    """Why a value (a `--set` value, parsed) is beyond the bounds a job file is held to, or None."""
    count = [0] if count is None else count
    count[0] += 1
    if depth > MAX_DEPTH:
        return f"nested more than {MAX_DEPTH} levels deep (or refers to itself); a job is a few levels deep"
    if count[0] > MAX_VALUES:
        return f"more than {MAX_VALUES:,} values once YAML aliases are expanded; a job holds a few hundred"
    if isinstance(value, str) and lone_surrogate(value):
        return lone_surrogate(value)
    items = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else ()
    for v in items:
        why = value_problem(v, depth + 1, count)
        if why is not None:
            return why
    return None


def text_problem(text: str) -> tuple[int, int, str] | None:
    """(line, column, why) when YAML text is beyond what is parsed at all: a character YAML does not allow,
    flow brackets nested too deep, too many keys and items, or a %YAML directive of a version the parser does
    not know (the parser reports the first and last with no line)."""
    bad = Reader.NON_PRINTABLE.search(text)
    if bad is not None:
        line, col = _line_col(text, bad.start())
        return line, col, (f"the character U+{ord(bad[0]):04X} is not allowed in YAML; remove it, or write it as an "
                           "escape (\\x.. or \\u....) inside double quotes")
    depth, line, entries, over = _shape(text)
    if depth > MAX_DEPTH:
        return line, 1, f"nested more than {MAX_DEPTH} levels deep; a job file is a few levels deep"
    if entries > MAX_ENTRIES:
        return over, 1, (f"more than {MAX_ENTRIES:,} keys and items; a job file holds a few hundred (long lists "
                         "belong in a data file the job names)")
    for m in re.finditer(r"^%YAML[ \t]+(\S*)", text, re.MULTILINE):
        if m[1] not in ("1.1", "1.2"):
            line, col = _line_col(text, m.start())
            return line, col, f"unsupported directive %YAML {shown(m[1])}; write %YAML 1.2 or leave the line out"
    return None


def _line_col(text: str, at: int) -> tuple[int, int]:
    return text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1


class Refused(ConstructorError):
    """YAML the syntax allows but a job file may not hold: a value Python cannot build (a 5,000-digit integer,
    2001-02-30), aliases that expand past MAX_VALUES, a value that contains itself. Marked at its node."""


def _expanded(node: Any, memo: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for once aliases are expanded (shared nodes counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise Refused(None, None, "this value contains itself through an alias; a job file's values are finite",
                      node.start_mark)
    open_.add(id(node))
    children = [n for kv in node.value for n in kv] if isinstance(node, MappingNode) else (
        node.value if isinstance(node, SequenceNode) else [])
    n = 1 + sum(_expanded(c, memo, open_) for c in children)
    open_.discard(id(node))
    memo[id(node)] = n
    if n > MAX_VALUES:
        raise Refused(None, None, f"more than {MAX_VALUES:,} values once YAML aliases are expanded; a job file "
                                  "holds a few hundred (aliases that expand into each other?)", node.start_mark)
    return n


def _marked(base: type[Any]) -> type[Any]:
    class Marked(base):  # type: ignore[misc, valid-type]
        def construct_document(self, node: Any) -> Any:
            # Counted before anything is built: building, or an error message quoting a value, would expand it.
            _expanded(node, {}, set())
            return super().construct_document(node)

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError, TypeError, KeyError) as e:
                what = str(node.tag).rsplit(":", 1)[-1] or "a value"
                why = "too many digits" if "integer string conversion" in str(e) else str(e)
                raise Refused(None, None, f"cannot read {shown(node.value)} as {what} ({why}); quote it to make it "
                                          "text", node.start_mark) from None

    Marked.__name__ = f"Marked{base.__name__}"
    return Marked


_ROUND_TRIP, _SAFE = _marked(RoundTripConstructor), _marked(SafeConstructor)


def yaml_reader(typ: str) -> YAML:
    """A ruamel YAML for `rt` (job files, with line marks) or `safe` (--set values) that raises Refused, at
    the node, for what it cannot or may not build."""
    yaml = YAML(typ=typ)
    yaml.Constructor = _ROUND_TRIP if typ == "rt" else _SAFE
    return yaml
