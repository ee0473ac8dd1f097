"""`--set KEY=VALUE` overrides: a dotted key into the job's data, a YAML value held to a job file's bounds.

Problems are marked `--set KEY:1:1`, so they print like a job file's (`--set train.steps:1:1: error: ...`).
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml.error import YAMLError

from runner.spec import models
from runner.spec.limits import MAX_FILE_BYTES, Refused, text_problem, value_problem, yaml_reader
from runner.spec.problems import Mark, Path_, Problem, SpecError, shown

KEY_CHARS = 80


def _mark(key: str) -> Mark:
    return Mark(f"--set {key if len(key) <= KEY_CHARS else key[:KEY_CHARS] + '...'}", 1, 1)


def _index(part: str) -> bool:
    return part.isascii() and part.isdigit()  # not str.isdigit alone: '²' is a digit int() refuses


def _value(key: str, raw: str) -> Any:
    def refuse(why: str) -> SpecError:
        return SpecError([Problem(_mark(key), key, f"the value {shown(raw)} {why}")])

    if not raw.strip():
        return ""
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise refuse(f"is longer than {MAX_FILE_BYTES:,} bytes, the most a whole job file may hold")
    beyond = text_problem(raw)
    if beyond is not None:
        raise refuse(f"is not accepted: {beyond[2]}")
    try:
        value = yaml_reader("safe").load(raw)
    except (YAMLError, RecursionError) as e:
        # A plain word YAML cannot read is meant as text; what looks like YAML, or what it could not build, is not.
        if isinstance(e, Refused):
            raise refuse(f"is not accepted: {e.problem}") from None
        if raw.lstrip().startswith(("[", "{", '"', "'")):
            raise refuse(f"is not valid YAML: {' '.join(str(e).split())[:200]}") from None
        return raw
    except Exception as e:  # noqa: BLE001 - the parser's own failures on input it does not expect
        raise refuse(f"is not valid YAML (the parser cannot read it: {type(e).__name__})") from None
    why = value_problem(value)
    if why is not None:
        raise refuse(f"is not accepted: {why}")
    return value


def apply_set(data: dict[str, Any], expr: str, marks: dict[Path_, Mark]) -> None:
    """Set one `KEY=VALUE` in `data` (in place) and mark the key as given on the command line."""
    cli = Mark("--set", 1, 1)
    if "=" not in expr:
        raise SpecError([Problem(cli, "", f"{shown(expr)} is not KEY=VALUE; write e.g. --set train.steps=100")])
    key, raw = expr.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError([Problem(cli, "", f"the key {shown(key)} has an empty segment; use dotted keys like "
                                          "--set train.lr=1e-4")])
    value = _value(key, raw)
    node: Any = data
    for i, p in enumerate(parts):
        here = ".".join(parts[:i]) or "the job"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not _index(p):
                raise SpecError([Problem(_mark(key), key,
                                         f"{here} is a list: address an item by its index, e.g. {here}.0.{p}")])
            if int(p) >= len(node):
                raise SpecError([Problem(_mark(key), key,
                                         f"{here} has {len(node)} item(s) (0-{len(node) - 1}); index {p} is out of range")])
            if last:
                node[int(p)] = value
            else:
                if not isinstance(node[int(p)], (dict, list)):
                    node[int(p)] = {}
                node = node[int(p)]
            continue
        if last:
            node[p] = value
        else:
            if not isinstance(node.get(p), (dict, list)):
                node[p] = {}
            node = node[p]
    path = tuple(int(p) if _index(p) else p for p in parts)
    for k in [k for k in marks if k[: len(path)] == path]:
        marks.pop(k)
    marks[path] = _mark(key)


def moved_set(expr: str, warnings: list[Problem]) -> str:
    """`--set resources.partition=x` -> `--set resources.slurm.partition=x`, with a warning."""
    key, sep, raw = expr.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or parts[0] != "resources" or parts[1] not in models.MOVED_RESOURCES:
        return expr
    section, new = models.MOVED_RESOURCES[parts[1]]
    warnings.append(Problem(_mark(key.strip()), key.strip(), f"moved to resources.{section}.{new}", "warning"))
    return f"resources.{section}.{new}={raw}"
