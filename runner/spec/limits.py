"""Bounds on a job file, checked before and while it is parsed, so hostile input is refused in milliseconds."""

from __future__ import annotations

# Bounds on a job file, so hostile input is refused in milliseconds: its size, how deep it nests, and how many
# values it holds once YAML aliases are expanded (a few hundred bytes of nested aliases can stand for billions).
MAX_FILE_BYTES = 1 << 20


MAX_DEPTH = 64


MAX_VALUES = 100_000


def flow_depth(text: str) -> tuple[int, int]:
    """The deepest nesting of YAML flow brackets ([ and {) and the line where it occurs, skipping quoted text and
    comments: the parser recurses per level and takes seconds on thousands, so this is checked before parsing."""
    depth = deepest = 0
    line = at = 1
    quote = ""
    prev = "\n"
    in_comment = False
    for ch in text:
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
    return deepest, at
