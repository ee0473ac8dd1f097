"""Tables read with the `datasets` library -> MCQ records: Hub data sets (`hf:`), parquet and arrow files,
`save_to_disk` folders, and JSON(L)/CSV files given `format: hf`; a source's `columns` say which column holds what.

Rows are numbered from 1, like lines: a bad one is reported as FILE:ROW (a Hub set: ID[:CONFIG][SPLIT]:ROW; row N
is `dataset[N - 1]`). The Hub is reached only when it answers within seconds; otherwise (or with HF_HUB_OFFLINE)
only the Hugging Face cache is read, and a set that is not there fails with how to use a local copy instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.spec.data_sources import ColumnMap
from runner.spec.models import DataSource
from runner.workloads.data.reading import ImportResult
from runner.workloads.data.records import MCQ, DataError, brief, make_mcq
from runner.workloads.scoring.prompts import LETTERS

TABLE_SUFFIXES = (".parquet", ".arrow")
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_OPTIONAL = ("topic", "id", "explanation", "difficulty")
_PROBE_SECONDS = 5.0
_LETTER = re.compile(r"\(?([A-Ja-j])[).:]?")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


# --- reaching the Hub ----------------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (offline mode set, or no connection within seconds); None if it answers."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _truthy(name):
            return f"{name} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy if proxy and endpoint.startswith("https") else endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    failure: list[str] = ["no answer"]

    def probe() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
            failure.clear()
        except OSError as e:
            failure[0] = e.strerror or str(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(_PROBE_SECONDS + 1)
    return f"cannot connect to {host}:{port} ({failure[0]})" if failure else None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode (cache only), however early they were imported."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    flags = [(m, a) for m, a in (("datasets.config", "HF_HUB_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE"))
             if m in sys.modules]
    saved = [getattr(sys.modules[m], a) for m, a in flags]
    for m, a in flags:
        setattr(sys.modules[m], a, True)
    try:
        yield
    finally:
        for (m, a), v in zip(flags, saved, strict=True):
            setattr(sys.modules[m], a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def import_hub(src: DataSource, out: ImportResult) -> None:
    """Append the records of the Hub data set `src.hf` (one split) to `out`."""
    import datasets  # here, not at the top: `runner validate` never imports it

    name = f"{src.hf}{f':{src.config}' if src.config else ''}"
    why_offline = hub_unreachable()
    with _offline() if why_offline else contextlib.nullcontext():
        try:
            ds = datasets.load_dataset(str(src.hf), name=src.config, split=src.split, revision=src.revision,
                                       cache_dir=os.environ.get("HF_DATASETS_CACHE"))
        except Exception as e:  # the library's errors have no common base; each becomes one readable line
            if why_offline:
                raise DataError(
                    f"data source hf:{src.hf}: the Hugging Face Hub cannot be used ({why_offline}) and the data set "
                    f"is not in the Hugging Face cache. Use a local copy: where there is network, save it with "
                    f"`datasets.load_dataset(...).save_to_disk(DIR)` (or download its parquet files) and give "
                    f"`path: DIR` in place of `hf:` ({_first_line(e)})"
                ) from None
            raise DataError(f"data source hf:{src.hf}: cannot load it: {_first_line(e)}") from None
    ds, split = _one_split(ds, src.split, f"hf:{src.hf}")
    split = split or (str(ds.split) if getattr(ds, "split", None) else None)
    out.details.update(hf=src.hf, config=src.config, split=split, revision=src.revision,
                       fingerprint=getattr(ds, "_fingerprint", None))
    where = f"[{split}]" if split else ""
    rows_to_records(ds, f"{name}{where}", src, out, source=str(src.hf), id_prefix=f"{src.hf}{where}")


def _one_split(ds: Any, split: str | None, name: str) -> tuple[Any, str | None]:
    """The one split of a DatasetDict that `split` names (or the only one) and its name; a Dataset as it is."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split is None or split not in ds:
            what = "holds several splits" if split is None else f"has no split {split!r}"
            raise DataError(f"data source {name}: {what}; set `split:` to one of {', '.join(ds)}")
        return ds[split], split
    return ds, None


# --- local tables ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars while a local file is read: they would fill the run's log."""
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _read_local(datasets: Any, path: Path, suffix: str) -> Any:
    if is_saved_dataset(path):
        return datasets.load_from_disk(str(path))
    if suffix == ".arrow":
        return datasets.Dataset.from_file(str(path))
    if suffix in _BUILDERS:
        return datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split="train",
                                     cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    raise DataError(f"{path}: not a table `datasets` reads (parquet, arrow, a save_to_disk folder, JSON Lines, CSV)")


def import_local(path: Path, out: ImportResult, src: DataSource) -> None:
    """Append the records of a local table (parquet, arrow, save_to_disk folder, JSON(L), CSV) to `out`."""
    import datasets

    suffix = path.suffix.lower()
    try:
        with _quiet():
            ds = _read_local(datasets, path, suffix)
    except DataError:
        raise
    except Exception as e:
        hint = "; for line numbers of bad JSON, read it with `format: jsonl`" if suffix in (".json", ".jsonl") else ""
        raise DataError(f"{path}: cannot read it as a table: {_first_line(e)}{hint}") from None
    if src.split is not None and not isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds one table; `split:` names a split of a save_to_disk folder of several "
                        "(a DatasetDict); remove it")
    ds, split = _one_split(ds, src.split, str(path))
    stem = path.stem if path.is_file() else path.name
    where = f"[{split}]" if split else ""  # a split of a save_to_disk DatasetDict
    rows_to_records(ds, f"{path}{where}", src, out, source=stem, id_prefix=f"{stem}{where}")
    out.files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [])


# --- rows -> records ---------------------------------------------------------------------------------


def _mapping(columns: ColumnMap | None, names: list[str]) -> dict[str, str | list[str]]:
    if columns is not None:
        return {k: v for k, v in columns.model_dump().items() if v is not None}
    return {"question": "question", "choices": "choices", "answer": "answer",
            **{k: k for k in _OPTIONAL if k in names}}


def rows_to_records(ds: Any, name: str, src: DataSource, out: ImportResult, *, source: str, id_prefix: str) -> None:
    """Each row of `ds` as a record (`name:ROW` its origin, `id_prefix/ROW` its id unless a column gives one), or a
    problem naming the row."""
    import datasets

    names = list(ds.column_names)
    mapping = _mapping(src.columns, names)
    need = list(dict.fromkeys(c for v in mapping.values() for c in (v if isinstance(v, list) else [v])))
    missing = [c for c in need if c not in names]
    if missing:
        how = "fix `columns:`" if src.columns is not None else "map its columns with `columns:` (question, " \
              "choices: a list column or [A, B, C, D], answer; topic, id, explanation, difficulty)"
        raise DataError(f"{name}: no column {', '.join(map(repr, missing))} (it has {', '.join(names) or 'none'}); "
                        f"{how}")
    labels = {c: ds.features[c].names for c in need if isinstance(ds.features.get(c), datasets.ClassLabel)}
    if ds.num_rows == 0:
        out.problems.append(f"{name}:1: the table has no rows")
        return
    row = 0
    for batch in ds.select_columns(need).iter(batch_size=1024):
        for j in range(len(batch[need[0]])):
            row += 1
            values = {c: batch[c][j] for c in need}
            try:
                out.records.append(_record(values, mapping, labels, row=row, name=name, src=src, source=source,
                                          id_prefix=id_prefix))
            except ValueError as e:
                out.problems.append(f"{name}:{row}: {e}")


def _text(field: str, col: str, v: Any, labels: dict[str, list[str]]) -> str | None:
    if col in labels and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(labels[col]):
        return labels[col][v]  # a class label: its name
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and field in ("id", "choice"):
        return str(v)
    raise ValueError(f"column {col!r} ({field}) holds {brief(v)}, not text")


def _choices(spec: str | list[str], v: dict[str, Any]) -> tuple[list[str], list[str] | None]:
    if isinstance(spec, list):  # one column per choice; empty trailing ones left out (rows with fewer choices)
        raw = [v[c] for c in spec]
        while raw and (raw[-1] is None or raw[-1] == ""):
            raw.pop()
        return [_text("choice", c, x, {}) or "" for c, x in zip(spec, raw, strict=False)], None
    value = v[spec]
    labels = None
    if isinstance(value, dict) and "text" in value:  # {"text": [...], "label": [...]}, as ARC's Hub layout
        value, labels = value["text"], value.get("label")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(value or [])):
            raise ValueError(f"column {spec!r}: `label` does not match `text` one to one")
        labels = None if labels is None else [str(x).strip() for x in labels]
    if not isinstance(value, list):
        raise ValueError(f"column {spec!r} holds {brief(value)}, not a list of choices")
    return [_text("choice", spec, x, {}) or "" for x in value], labels


def _answer(value: Any, choices: list[str], labels: list[str] | None, col: str) -> int | str:
    """A 0-based index or a letter, from a letter, an index, a choice label or the text of a choice."""
    if value is None:
        raise ValueError(f"missing answer (column {col!r} is empty)")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"answer {brief(value)} (column {col!r}) is not a letter, a 0-based index or choice text")
    s = value.strip()
    if labels and s in labels:
        return labels.index(s)
    same = [i for i, c in enumerate(choices) if c.strip() == s] or [
        i for i, c in enumerate(choices) if c.strip().casefold() == s.casefold()]
    letter = _LETTER.fullmatch(s)
    if letter:
        i = LETTERS.index(letter.group(1).upper())
        if same and same != [i]:
            raise ValueError(f"answer {brief(value)} is ambiguous: the letter {LETTERS[i]} or choice "
                             f"{LETTERS[same[0]]}'s text")
        return LETTERS[i]
    if len(same) == 1:
        return same[0]
    if same:
        raise ValueError(f"answer {brief(value)} is the text of {len(same)} choices")
    if s.isdigit():  # 0- or 1-based? Not guessed
        raise ValueError(f"answer {brief(value)} is a number written as text; give 0-based indices as integers, "
                         "or letters")
    last = LETTERS[max(len(choices), 1) - 1]
    raise ValueError(f"answer {brief(value)} is not a letter A-{last}, a 0-based index or the text of a choice")


def _record(v: dict[str, Any], m: dict[str, Any], labels: dict[str, list[str]], *, row: int, name: str,
            src: DataSource, source: str, id_prefix: str) -> MCQ:
    def opt(field: str) -> str | None:
        return _text(field, m[field], v[m[field]], labels) if field in m else None

    question = _text("question", m["question"], v[m["question"]], labels)
    if not question or not question.strip():
        raise ValueError(f"missing or empty question (column {m['question']!r})")
    choices, choice_labels = _choices(m["choices"], v)
    return make_mcq(  # a class-label answer stays its index: the position of the right choice
        id=opt("id") or f"{id_prefix}/{row}",
        question=question,
        choices=choices,
        answer=_answer(v[m["answer"]], choices, choice_labels, m["answer"]),
        topic=opt("topic") or src.topic or "general",
        source=source,
        difficulty=opt("difficulty") or "medium",
        explanation=opt("explanation"),
        origin=f"{name}:{row}",
    )
