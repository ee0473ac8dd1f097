"""MCQ records and their importers (canonical JSONL, MMLU CSV, ARC/OpenBookQA/CommonsenseQA, tournament JSON),
deduplication, the stratified train/validation split, and the `prepare` job kind.

Bad rows are never dropped silently: each is reported as `FILE:LINE: reason`. A source with more bad rows than
`data.max_bad_rows` (default 0) fails the job with the whole list; at or under it they are skipped and listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.runs import atomic_write
from runner.spec.models import DataSource, DataSpec
from runner.workloads.builtin_data import generate as generate_builtin
from runner.workloads.prompts import LETTERS, strip_choice_prefix

DIFFICULTIES = ("easy", "medium", "hard")
DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


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

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["explanation"] is None:
            del d["explanation"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, default_id: str, topic: str | None = None, source: str = "") -> MCQ:
        """Validate a canonical record dict; raise ValueError with a short reason."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
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
) -> MCQ:
    """Build a checked MCQ: 2-10 non-empty choices, answer a valid letter (or index), known difficulty."""
    choices = [c.strip() for c in choices]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"needs 2-{len(LETTERS)} choices, got {len(choices)}")
    if any(not c for c in choices):
        raise ValueError("empty choice")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
        letter = LETTERS[answer]
    elif isinstance(answer, str):
        m = re.match(r"^\s*\(?([A-Ja-j])\)?(?:[\).:]|\s|$)", answer)
        if not m:
            raise ValueError(f"answer {answer!r} is not a letter A-{LETTERS[len(choices) - 1]}")
        letter = m.group(1).upper()
    else:
        raise ValueError("missing 'answer'")
    if LETTERS.index(letter) >= len(choices):
        raise ValueError(f"answer {letter} but only {len(choices)} choices")
    difficulty = str(difficulty).lower()
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    if explanation is not None and not isinstance(explanation, str):
        raise ValueError("'explanation' must be a string")
    return MCQ(
        id=id,
        question=question.strip(),
        choices=list(choices),
        answer=letter,
        topic=str(topic),
        source=str(source),
        difficulty=difficulty,
        explanation=explanation or None,
    )


@dataclass
class ImportResult:
    records: list[MCQ] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: reason"
    files: list[Path] = field(default_factory=list)


class DataError(Exception):
    """Data that cannot be used; str() is a readable list of the problems."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        shown = self.problems[:50]
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(message + "".join(f"\n  {p}" for p in shown) + more)


# --- importers: each reads one file and appends to an ImportResult -------------------------------------


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


def _select(records: list[MCQ], src: DataSource, seed: int) -> list[MCQ]:
    if src.topics is not None:
        known = {r.topic for r in records}
        missing = [t for t in src.topics if t not in known]
        if missing:
            raise DataError(
                f"data source {src.path!r}: topics {missing} not found; available: {', '.join(sorted(known))}"
            )
        wanted = set(src.topics)
        records = [r for r in records if r.topic in wanted]
    if src.limit is not None and len(records) > src.limit:
        rng = random.Random(f"limit:{seed}:{src.path}")
        idx = sorted(rng.sample(range(len(records)), src.limit))
        records = [records[i] for i in idx]
    return records


def load_sources(
    sources: Sequence[DataSource], *, seed: int = 0, max_bad_rows: int = 0, base_dir: Path | None = None
) -> list[MCQ]:
    """Import, filter (`topics`, `limit`) and concatenate sources: the one entry point every workload uses.

    Raises DataError listing every bad row when a source has more than `max_bad_rows`; otherwise the bad rows
    are printed to stderr as warnings and skipped.
    """
    records, _ = load_sources_with_report(sources, seed=seed, max_bad_rows=max_bad_rows, base_dir=base_dir)
    return records


def load_sources_with_report(
    sources: Sequence[DataSource], *, seed: int = 0, max_bad_rows: int = 0, base_dir: Path | None = None
) -> tuple[list[MCQ], list[dict[str, Any]]]:
    """Like load_sources, also returning per-source facts for manifests (files with sha256, counts, problems)."""
    out: list[MCQ] = []
    report: list[dict[str, Any]] = []
    for src in sources:
        res = import_source(src, base_dir)
        if len(res.problems) > max_bad_rows:
            raise DataError(
                f"data source {src.path!r}: {len(res.problems)} bad row(s) (data.max_bad_rows is {max_bad_rows}); "
                "fix them or raise data.max_bad_rows to skip them",
                res.problems,
            )
        for p in res.problems:
            print(f"warning: skipped bad row {p}", file=sys.stderr)
        selected = _select(res.records, src, seed)
        out.extend(selected)
        report.append(
            {
                "path": src.path,
                "files": [{"path": str(f), "sha256": sha256_file(f)} for f in res.files],
                "imported": len(res.records),
                "selected": len(selected),
                "bad_rows": res.problems,
            }
        )
    return out, report


# --- dedupe and split ----------------------------------------------------------------------------------


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def dedupe_key(r: MCQ) -> str:
    """Normalised question + choices (case and whitespace folded); the answer is not part of identity."""
    return "\x1f".join([_norm(r.question), *(_norm(c) for c in r.choices)])


def dedupe(records: Iterable[MCQ], exclude: Iterable[MCQ] = ()) -> tuple[list[MCQ], int]:
    """Keep the first of each normalised question; also drop any that appear in `exclude` (e.g. validation)."""
    records = list(records)
    seen = {dedupe_key(r) for r in exclude}
    out: list[MCQ] = []
    for r in records:
        k = dedupe_key(r)
        if k in seen:
            continue
        seen.add(k)
        out.append(r)
    return out, len(records) - len(out)


def split_records(records: Sequence[MCQ], val_fraction: float, seed: int) -> tuple[list[MCQ], list[MCQ]]:
    """Deterministic split stratified by topic: each topic gives round(n * val_fraction) records to val.

    Records are ranked by a seeded hash of their content, so the split does not depend on input order and a
    record stays on its side when others are added.
    """
    by_topic: dict[str, list[MCQ]] = {}
    for r in records:
        by_topic.setdefault(r.topic, []).append(r)
    val_keys: set[str] = set()
    for topic in sorted(by_topic):
        group = sorted(by_topic[topic], key=lambda r: hashlib.sha256(f"{seed}\x00{dedupe_key(r)}".encode()).digest())
        n_val = round(len(group) * val_fraction)
        if val_fraction > 0 and n_val == 0 and len(group) >= 2:
            n_val = 1
        val_keys.update(dedupe_key(r) for r in group[:n_val])
    train = [r for r in records if dedupe_key(r) not in val_keys]
    val = [r for r in records if dedupe_key(r) in val_keys]
    return train, val


def subsample(records: Sequence[MCQ], limit: int | None, seed: int) -> list[MCQ]:
    """A fixed, seeded subset of at most `limit` records (input order kept)."""
    if limit is None or len(records) <= limit:
        return list(records)
    idx = sorted(random.Random(f"subsample:{seed}").sample(range(len(records)), limit))
    return [records[i] for i in idx]


def train_val_records(data: DataSpec, base_dir: Path | None = None) -> tuple[list[MCQ], list[MCQ], dict[str, Any]]:
    """The train and validation records of a job: load, dedupe, split (or load val), drop leaks into val."""
    max_bad = data.max_bad_rows
    train_all, train_report = load_sources_with_report(data.train, seed=data.seed, max_bad_rows=max_bad, base_dir=base_dir)
    if not train_all:
        raise DataError("data.train: the sources hold no records")
    train_all, dupes = dedupe(train_all)
    val_report: list[dict[str, Any]] = []
    if data.val:
        val, val_report = load_sources_with_report(data.val, seed=data.seed, max_bad_rows=max_bad, base_dir=base_dir)
        val, val_dupes = dedupe(val)
        train, leaked = dedupe(train_all, exclude=val)
    else:
        train, val = split_records(train_all, data.val_fraction, data.seed)
        val_dupes = leaked = 0
    val = subsample(val, data.val_limit, data.seed)
    info = {
        "train_sources": train_report,
        "val_sources": val_report,
        "duplicates_removed": dupes + val_dupes,
        "train_removed_as_in_val": leaked,
    }
    return train, val, info


# --- files ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: Path, records: Iterable[MCQ]) -> None:
    buf = io.StringIO()
    for r in records:
        buf.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    atomic_write(path, buf.getvalue())


def read_jsonl(path: Path) -> list[MCQ]:
    res = ImportResult()
    _import_jsonl(path, res, None)
    if res.problems:
        raise DataError(f"{path}: bad records", res.problems)
    return res.records


def counts(records: Sequence[MCQ]) -> dict[str, Any]:
    return {
        "total": len(records),
        "by_topic": dict(sorted(Counter(r.topic for r in records).items())),
        "by_source": dict(sorted(Counter(r.source for r in records).items())),
        "by_difficulty": {d: sum(1 for r in records if r.difficulty == d) for d in DIFFICULTIES},
    }


# --- the `prepare` job kind ----------------------------------------------------------------------------


def run(job: Any, run_dir: Path) -> int:
    """Import, dedupe and split; write train.jsonl, val.jsonl and manifest.json into the run directory."""
    spec = job.spec
    try:
        train, val, info = train_val_records(spec.data, base_dir=Path.cwd())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_dir / "train.jsonl", train)
    write_jsonl(run_dir / "val.jsonl", val)
    manifest = {
        "inputs": info["train_sources"] + info["val_sources"],
        "duplicates_removed": info["duplicates_removed"],
        "train_removed_as_in_val": info["train_removed_as_in_val"],
        "seed": spec.data.seed,
        "val_fraction": spec.data.val_fraction if not spec.data.val else None,
        "train": counts(train),
        "val": counts(val),
        "outputs": {
            name: {"path": name, "sha256": sha256_file(run_dir / name)} for name in ("train.jsonl", "val.jsonl")
        },
    }
    atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    bad = sum(len(s["bad_rows"]) for s in manifest["inputs"])
    print(
        f"prepared {len(train)} train / {len(val)} val records "
        f"({info['duplicates_removed']} duplicates removed, {bad} bad rows skipped) -> {run_dir}"
    )
    return 0
