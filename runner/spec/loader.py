"""Load job files: YAML with line marks, `extends:` fragments, `--set` overrides and `${env:X}` values.

Every problem comes back as a `Problem` that points at FILE:LINE:COL and names the dotted field path,
so `runner validate` can print one line per problem and never a traceback. Deprecated keys still load, with a
warning `Problem` each.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from runner.spec import models
from runner.spec.data_paths import missing_data_paths
from runner.spec.hashing import spec_hash
from runner.spec.kinds import JOB_MODELS
from runner.spec.limits import (
    MAX_DEPTH,
    MAX_VALUES,
    Refused,
    file_problem,
    lone_surrogate,
    read_text,
    resolved,
    text_problem,
    yaml_reader,
)
from runner.spec.overrides import apply_set, moved_set
from runner.spec.problems import SHOWN_CHARS, Mark, Path_, Problem, SpecError, shown

ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Job:
    """A validated, fully resolved job."""

    spec: BaseModel
    source: Path
    # Dotted paths whose values came from `${env:...}`, with the template as written: stored and hashed as
    # the template, so a token never lands in a run directory and rotating it does not change the spec hash.
    templates: dict[str, str] = field(default_factory=dict)
    # Deprecated keys the job file used (they still work): one warning each, for the CLI to print.
    warnings: list[Problem] = field(default_factory=list)

    @property
    def secret_paths(self) -> set[str]:
        return set(self.templates)

    @property
    def kind(self) -> str:
        return str(self.spec.kind)  # type: ignore[attr-defined]

    @property
    def name(self) -> str:
        return str(self.spec.name)  # type: ignore[attr-defined]

    def data(self) -> dict[str, Any]:
        """The resolved spec, values from the environment included (never write this to disk)."""
        return self.spec.model_dump(mode="json")

    def stored_data(self) -> dict[str, Any]:
        """The resolved spec as it is stored in a run: `${env:...}` values kept as their templates."""
        return put_templates(self.data(), self.templates)

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.stored_data())


def put_templates(data: dict[str, Any], templates: dict[str, str]) -> dict[str, Any]:
    """`data` with the value at each dotted path of `templates` (a Job's `${env:...}` values) replaced by its
    template as written; paths `data` does not have are passed over. Changes `data` in place and returns it."""
    for dotted, template in templates.items():
        node: Any = data
        *parents, last = dotted.split(".")
        try:
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            if isinstance(node, list):
                node[int(last)] = template
            elif last in node:
                node[last] = template
        except (KeyError, IndexError, ValueError, TypeError):
            continue
    return data


# --- YAML with marks -----------------------------------------------------------------------------------


def _problem_at(file: str, path: Path_, marks: dict[Path_, Mark], why: str) -> SpecError:
    mark = next((marks[path[:i]] for i in range(len(path), -1, -1) if path[:i] in marks), Mark(file, 1, 1))
    return SpecError([Problem(mark, _dotted(path), why)])


def _plain(node: Any, file: str, path: Path_, marks: dict[Path_, Mark]) -> Any:
    """CommentedMap/Seq -> dict/list, recording a mark for every key and item."""
    if len(path) > MAX_DEPTH:
        raise _problem_at(file, path, marks, f"nested more than {MAX_DEPTH} levels deep; a job file is a few levels deep")
    if len(marks) > MAX_VALUES:
        raise _problem_at(file, path, marks, f"more than {MAX_VALUES:,} values once YAML aliases are expanded; "
                                          "a job file holds a few hundred (aliases that expand into each other?)")
    if isinstance(node, CommentedMap):
        out = {}
        for k in node:
            try:
                line, col = node.lc.key(k)
            except (KeyError, TypeError):
                line, col = node.lc.line, node.lc.col
            marks[(*path, str(k))] = Mark(file, line + 1, col + 1)
            if (why := lone_surrogate(str(k))) is not None:
                raise _problem_at(file, (*path, str(k)), marks, f"the key {why}")
            out[str(k)] = _plain(node[k], file, (*path, str(k)), marks)
        return out
    if isinstance(node, CommentedSeq):
        out_l = []
        for i, v in enumerate(node):
            try:
                line, col = node.lc.item(i)
            except (KeyError, TypeError, IndexError):
                line, col = node.lc.line, node.lc.col
            marks[(*path, i)] = Mark(file, line + 1, col + 1)
            out_l.append(_plain(v, file, (*path, i), marks))
        return out_l
    if node is not None and not isinstance(node, (str, int, float, bool)):
        node = str(node) if not hasattr(node, "isoformat") else node.isoformat()
    if isinstance(node, str) and (why := lone_surrogate(node)) is not None:
        raise _problem_at(file, path, marks, f"the value {why}")
    return node


def _read_yaml(path: Path, marks: dict[Path_, Mark]) -> dict[str, Any]:
    file = str(path)
    text = read_text(path, file)
    beyond = text_problem(text)
    if beyond is not None:
        raise SpecError([Problem(Mark(file, beyond[0], beyond[1]), "", beyond[2])])
    yaml = yaml_reader("rt")
    try:
        with warnings.catch_warnings():  # the parser's notes (a reused anchor) would print as loose lines
            warnings.simplefilter("ignore")
            doc = yaml.load(text)
    except RecursionError:
        raise SpecError([Problem(Mark(file, 1, 1), "", f"nested too deeply to read; a job file is a few levels deep "
                                                       f"(at most {MAX_DEPTH})")]) from None
    except MarkedYAMLError as e:
        m = e.problem_mark or e.context_mark
        line, col = (m.line + 1, m.column + 1) if m else (1, 1)
        msg = " ".join(" ".join(x for x in (e.context, e.problem) if x).split()) or "invalid YAML"
        msg = msg if len(msg) <= 4 * SHOWN_CHARS else msg[: 4 * SHOWN_CHARS] + "..."  # it may quote whole values
        msg = msg if isinstance(e, Refused) else f"invalid YAML: {msg}"
        raise SpecError([Problem(Mark(file, line, col), "", msg)]) from None
    except YAMLError as e:
        raise SpecError([Problem(Mark(file, 1, 1), "", f"invalid YAML: {' '.join(str(e).split())}")]) from None
    except Exception as e:  # noqa: BLE001 - the parser's own failures on input it does not expect: still an answer
        raise SpecError([Problem(Mark(file, 1, 1), "", f"invalid YAML the parser cannot read ({type(e).__name__})")]) from None
    if doc is None:
        raise SpecError([Problem(Mark(file, 1, 1), "", "the file is empty; a job needs at least `kind` and `name`")])
    if not isinstance(doc, CommentedMap):
        raise SpecError([Problem(Mark(file, 1, 1), "", "a job file must be a mapping of keys to values")])
    marks[()] = Mark(file, 1, 1)
    return _plain(doc, file, (), marks)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _move_deprecated(data: dict[str, Any], marks: dict[Path_, Mark], warnings: list[Problem]) -> None:
    """Move one file's flat `resources` keys into their sections, before it is merged with the files it extends
    (so a flat key overrides a base's sectioned one as it did before), with a warning per key."""
    res = data.get("resources")
    if not isinstance(res, dict):
        return
    data["resources"], moved = models.move_flat_resources(res)
    for old in moved:
        section, key = models.MOVED_RESOURCES[old]
        mark = marks.pop(("resources", old), marks[()])
        marks[("resources", section, key)] = mark
        warnings.append(Problem(mark, f"resources.{old}", f"moved to resources.{section}.{key}", "warning"))


def _load_tree(path: Path, marks: dict[Path_, Mark], stack: tuple[Path, ...],
               warnings: list[Problem]) -> dict[str, Any]:
    """Read `path` and everything it extends; later files win, the extending file wins over its bases."""
    own_marks: dict[Path_, Mark] = {}
    data = _read_yaml(path, own_marks)
    _move_deprecated(data, own_marks, warnings)
    ext = data.pop("extends", None)
    merged: dict[str, Any] = {}
    base_marks: dict[Path_, Mark] = {}
    if ext is not None:
        bases = [ext] if isinstance(ext, str) else ext
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise SpecError([Problem(own_marks[("extends",)], "extends", "must be a path or a list of paths")])
        for i, b in enumerate(bases):
            mark = own_marks.get(("extends", i), own_marks[("extends",)])
            target = resolved(path.parent / b)
            why = file_problem(target)
            if why == "not found":
                hint = f"looked for {shown(str(target), 300)}; paths are relative to {path.parent}"
                raise SpecError([Problem(mark, "extends", f"file {shown(b)} not found ({hint})")])
            if why is not None:
                raise SpecError([Problem(mark, "extends", f"file {shown(b)} {why}")])
            if target in stack:
                chain = " -> ".join(p.name for p in (*stack, target))
                raise SpecError([Problem(mark, "extends", f"extends cycle: {chain}")])
            merged = _deep_merge(merged, _load_tree(target, base_marks, (*stack, target), warnings))
    own_marks.pop(("extends",), None)
    own_marks = {k: v for k, v in own_marks.items() if not (k and k[0] == "extends")}
    # A key set by the extending file takes the extending file's mark; lists are replaced whole.
    for k in list(base_marks):
        if k in own_marks or any(k[: len(o)] == o and _is_list_path(data, o) for o in own_marks):
            base_marks.pop(k)
    marks.update(base_marks)
    marks.update(own_marks)
    return _deep_merge(merged, data)


def _is_list_path(data: Any, path: Path_) -> bool:
    node = data
    for p in path:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(node, list)


# --- overrides and interpolation ---------------------------------------------------------------------


def _interpolate(node: Any, path: Path_, marks: dict[Path_, Mark], problems: list[Problem],
                 secrets: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, (*path, k), marks, problems, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*path, i), marks, problems, secrets) for i, v in enumerate(node)]
    if isinstance(node, str) and "${env:" in node:
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None:
                if default is not None:
                    return default
                problems.append(Problem(
                    _mark_for(path, marks), _dotted(path),
                    f"environment variable {name} is not set; export it or write ${{env:{name}:-default}}",
                ))
                return ""
            return val
        secrets[_dotted(path)] = node
        return ENV_RE.sub(sub, node)
    return node


# --- validation ----------------------------------------------------------------------------------------


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def _mark_for(path: Path_, marks: dict[Path_, Mark]) -> Mark:
    p = tuple(path)
    while p:
        if p in marks:
            return marks[p]
        p = p[:-1]
    return marks.get((), Mark("?", 1, 1))


def _model_at(model: type[BaseModel], path: Path_) -> type[BaseModel] | None:
    """The Pydantic model class that holds the field at `path` (for 'did you mean')."""
    import typing

    cur: Any = model
    for p in path:
        if isinstance(p, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or p not in cur.model_fields:
            return None
        ann = cur.model_fields[p].annotation
        cur = None
        for cand in [ann, *typing.get_args(ann)]:
            for c in [cand, *typing.get_args(cand)]:
                if isinstance(c, type) and issubclass(c, BaseModel):
                    cur = c
                    break
            if cur is not None:
                break
        if cur is None:
            return None
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def _image_problem(data: dict[str, Any], marks: dict[Path_, Mark]) -> Problem | None:
    """`image:` names no definition in images/ (it would fail only at `runner plan`/`run` on a container backend)."""
    image = data.get("image")
    if not isinstance(image, str):
        return None  # absent (the default) or not a string, which the model reports
    from runner.images import image_names

    names = image_names()
    if not names or image in names:
        return None  # no images/ here (an installed package): nothing to check against
    close = difflib.get_close_matches(image, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return Problem(_mark_for(("image",), marks), "image",
                   f"unknown image {image!r} (valid: {', '.join(names)}; images/<name>.yaml defines each){hint}")


def _type_hint(typ: str, value: Any) -> str:
    """How to write a value the strict schema refused: the common YAML slips."""
    if typ in ("int_type", "float_type") and isinstance(value, str):
        return "; write the number without quotes"
    if typ == "bool_type" and isinstance(value, str):
        return "; write true or false without quotes"
    if typ == "int_type" and isinstance(value, bool):
        return "; true/false is not a number"
    if typ == "int_type" and isinstance(value, float):
        return "; write a whole number (no decimal point)"
    if typ == "string_type" and isinstance(value, (int, float, bool)):
        return "; quote it to make it text"
    if typ == "finite_number":
        return "; numbers in a job must be finite (no .inf or .nan)"
    return ""


def _problems_from(err: ValidationError, model: type[BaseModel], marks: dict[Path_, Mark]) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc: Path_ = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        raised = (e.get("ctx") or {}).get("error")
        if isinstance(raised, models.At):  # a validator that names the field below it that is wrong
            loc = loc + raised.path
        typ = e["type"]
        if typ == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            msg = f"unknown key {shown(loc[-1])}"
            if owner is not None:
                msg += _suggest(str(loc[-1]), list(owner.model_fields))
            out.append(Problem(_mark_for(loc, marks), _dotted(loc), msg))
        elif typ == "missing":
            out.append(Problem(_mark_for(loc[:-1], marks), _dotted(loc), "required field is missing"))
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if isinstance(e.get("input"), str) and len(msg) > 2 * SHOWN_CHARS:  # a validator that quotes the value
                msg = msg.replace(repr(e["input"]), shown(e["input"]))
            if "input" in e and typ not in ("model_type", "dict_type") and not isinstance(e["input"], (dict, list)):
                msg += f" (got {shown(e['input'])}){_type_hint(typ, e['input'])}"
            out.append(Problem(_mark_for(loc, marks), _dotted(loc), msg))
    return out


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = (), backend: str | None = None) -> Job:
    """Read, merge, interpolate and validate one job file; raise SpecError with every problem found."""
    p = Path(path)
    marks: dict[Path_, Mark] = {}
    warnings: list[Problem] = []
    full = resolved(p)
    data = _load_tree(full, marks, (full,), warnings)
    # Show marks with the path as the user wrote it.
    as_given, as_read = str(p), str(full)
    for k, m in list(marks.items()):
        if m.file == as_read:
            marks[k] = Mark(as_given, m.line, m.col)
    marks[()] = Mark(as_given, 1, 1)
    warnings = [replace(w, mark=Mark(as_given, w.mark.line, w.mark.col)) if w.mark.file == as_read else w
                for w in warnings]
    for expr in overrides:
        apply_set(data, moved_set(expr, warnings), marks)
    if backend is not None:
        data["backend"] = backend
    return _resolve(data, marks, p, warnings, check_image=True)


def _resolve(data: dict[str, Any], marks: dict[Path_, Mark], source: Path,
             warnings: list[Problem] | None = None, check_image: bool = False) -> Job:
    """Interpolate and validate; `check_image` for job files (a stored run is read where images/ may be absent)."""
    as_given = str(source)
    problems: list[Problem] = []
    secrets: dict[str, str] = {}
    data = _interpolate(data, (), marks, problems, secrets)
    image = _image_problem(data, marks) if check_image else None
    if image is not None:
        problems.append(image)
    kind = data.get("kind")
    if kind is None:
        problems.append(Problem(marks[()], "kind", f"required field is missing; one of: {', '.join(JOB_MODELS)}"))
        raise SpecError(problems)
    if not isinstance(kind, str) or kind not in JOB_MODELS:
        close = difflib.get_close_matches(kind, list(JOB_MODELS), n=1) if isinstance(kind, str) else []
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(JOB_MODELS)}"
        problems.append(Problem(_mark_for(("kind",), marks), "kind", f"unknown kind {shown(kind)}; {hint}"))
        raise SpecError(problems)
    model = JOB_MODELS[kind]
    try:
        spec = model.model_validate(data)
    except ValidationError as e:
        problems.extend(_problems_from(e, model, marks))
    else:
        if check_image:  # a job file, validated where it is submitted: its local data must be here
            problems.extend(Problem(_mark_for(loc, marks), _dotted(loc), msg) for loc, msg in missing_data_paths(spec))

    def order(q: Problem) -> tuple[bool, int, int]:
        return q.mark.file != as_given, q.mark.line, q.mark.col

    warnings = sorted(warnings or [], key=order)
    if problems:
        raise SpecError(sorted(problems + warnings, key=order))
    return Job(spec=spec, source=source, templates=secrets, warnings=warnings)


def job_from_stored(data: dict[str, Any], source: str = "job.yaml") -> Job:
    """Rebuild a Job from a run's stored job.yaml, filling `${env:...}` values from this environment."""
    data = {k: v for k, v in data.items() if k != "spec_hash"}
    return _resolve(data, {(): Mark(source, 1, 1)}, Path(source))


def job_from_data(data: dict[str, Any], source: str = "job.yaml") -> Job:
    """Rebuild a Job from a resolved spec (a run's job.yaml), validating it again."""
    kind = data.get("kind")
    model = JOB_MODELS.get(str(kind))
    if model is None:
        raise SpecError([Problem(Mark(source, 1, 1), "kind", f"unknown kind {shown(kind)}")])
    try:
        return Job(spec=model.model_validate(data), source=Path(source))
    except ValidationError as e:
        raise SpecError(_problems_from(e, model, {(): Mark(source, 1, 1)})) from None
