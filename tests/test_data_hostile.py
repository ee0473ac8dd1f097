"""Hostile data files: wrong encodings, binary garbage, deep JSON, BOMs, control characters, huge lines, empty
and ragged files. Each must end as a FILE:LINE problem or a DataError, never a traceback."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from runner.spec import job_from_data
from runner.spec.models import DataSource, DataSpec
from runner.workloads.data import importers, records, sets
from runner.workloads.recipes import prepare

MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"
if not MMLU.exists():
    MMLU = Path("/work/shared/data/mmlu")
ALGEBRA = MMLU / "val" / "abstract_algebra_val.csv"
needs_mmlu = pytest.mark.skipif(not ALGEBRA.exists(), reason="shared MMLU files not present")

SMALL_CSV = b"What is 1+1?,1,2,3,4,B\nWhat is 2+2?,2,3,4,5,C\nWhat is 3+3?,5,6,7,8,B\n"


def _problems(path: Path, **kw: object) -> list[str]:
    return importers.import_source(DataSource(path=str(path), **kw)).problems  # type: ignore[arg-type]


def _load_error(path: Path, **kw: object) -> str:
    with pytest.raises(records.DataError) as e:
        sets.load_sources([DataSource(path=str(path), **kw)])  # type: ignore[arg-type]
    return str(e.value)


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _rec(q: str = "Q?", **kw: object) -> dict[str, object]:
    return {"question": q, "choices": ["a", "b", "c"], "answer": "B", **kw}


# --- encodings and binary files ------------------------------------------------------------------------


@needs_mmlu
def test_latin1_byte_in_real_mmlu_csv_names_file_and_line(tmp_path: Path) -> None:
    lines = ALGEBRA.read_bytes().split(b"\n")
    lines[4] = b"caf\xe9 " + lines[4]
    f = tmp_path / "abstract_algebra_val.csv"
    f.write_bytes(b"\n".join(lines))
    msg = _load_error(f)
    assert f"{f}:5: not UTF-8 text (byte 0xe9 at column 4)" in msg
    assert "save the file as UTF-8" in msg


@pytest.mark.parametrize("name", ["garbage.csv", "garbage.jsonl", "garbage.json"])
def test_binary_garbage_is_a_data_error(tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_bytes(random.Random(7).randbytes(8192))
    msg = _load_error(f)
    assert re.search(rf"{re.escape(str(f))}:\d+: not UTF-8 text", msg), msg


def test_latin1_jsonl_and_json_name_the_line(tmp_path: Path) -> None:
    good = json.dumps(_rec())
    f = tmp_path / "q.jsonl"
    bad = json.dumps(_rec("caf\u00e9?"), ensure_ascii=False).encode("latin-1")
    f.write_bytes(good.encode() + b"\n" + bad + b"\n")
    assert f"{f}:2: not UTF-8 text" in _load_error(f)
    t = tmp_path / "questions.json"
    t.write_bytes(json.dumps([_rec(), _rec("na\u00efve?")], indent=2, ensure_ascii=False).encode("latin-1"))
    assert re.search(rf"{re.escape(str(t))}:\d+: not UTF-8 text", _load_error(t))


def test_utf16_file_is_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_bytes(SMALL_CSV.decode().encode("utf-16"))
    assert f"{f}:1: the file is UTF-16 text; save it as UTF-8" in _load_error(f)


def test_a_device_is_not_a_data_file() -> None:
    assert "not a regular file" in _load_error(Path("/dev/null"), format="jsonl")


# --- JSON nesting and numbers ----------------------------------------------------------------------------


def test_deeply_nested_json_file_is_a_problem_not_a_recursion_error(tmp_path: Path) -> None:
    f = tmp_path / "questions.json"
    f.write_text("\n" + "[" * 100_000)
    assert _problems(f) == [f"{f}:2: JSON nested deeper than {importers.MAX_JSON_DEPTH} levels; "
                            "a question needs 3 at most"]
    obj = tmp_path / "wrapped.json"
    obj.write_text('{"questions": [\n' + json.dumps(_rec(id="x" * 3, explanation=None)) + ",\n"
                   + '{"question": ' + "[" * 5000 + "]" * 5000 + "}]}")
    assert f"{obj}:3: JSON nested deeper" in _problems(obj)[0]


def test_deeply_nested_jsonl_line_is_a_bad_row(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [_rec(), '{"question": ' + "[" * 100_000, _rec("Q2?")])
    assert [p.split(": ", 1)[0] for p in _problems(f)] == [f"{f}:2"]
    assert "nested deeper" in _problems(f)[0]
    assert [r.question for r in sets.load_sources([DataSource(path=str(f))], max_bad_rows=1)] == ["Q?", "Q2?"]


def test_huge_integer_in_json_is_a_problem(tmp_path: Path) -> None:
    f = tmp_path / "questions.json"
    f.write_text('[\n{"question": "Q?", "choices": ["a", "b"], "answer": ' + "9" * 5000 + "}\n]")
    (p,) = _problems(f)
    assert p == f"{f}:2: invalid JSON: a number of more than 4300 digits"
    g = _jsonl(tmp_path / "q.jsonl", ['{"question": "Q?", "choices": ["a", "b"], "answer": ' + "9" * 5000 + "}"])
    assert _problems(g)[0].startswith(f"{g}:1: ")


def test_tournament_object_layout_reports_item_lines(tmp_path: Path) -> None:
    f = tmp_path / "questions.json"
    f.write_text(json.dumps({"questions": [_rec(), _rec(answer="Z"), _rec('say \\"hi\\" [')]}, indent=2))
    (p,) = _problems(f)
    assert p.startswith(f"{f}:12: answer 'Z'"), p  # the second item opens on line 12
    assert importers.import_source(DataSource(path=str(f))).records[1].origin == f"{f}:21"


# --- byte order marks ------------------------------------------------------------------------------------


@needs_mmlu
def test_bom_is_stripped_from_csv_jsonl_and_json(tmp_path: Path) -> None:
    f = tmp_path / "abstract_algebra_val.csv"
    f.write_bytes(b"\xef\xbb\xbf" + ALGEBRA.read_bytes())
    recs = sets.load_sources([DataSource(path=str(f))])
    assert recs[0].question == "The cyclic subgroup of Z_24 generated by 18 has order"
    assert len(recs) == len(sets.load_sources([DataSource(path=str(ALGEBRA))]))
    j = tmp_path / "q.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec()).encode() + b"\n")
    assert sets.load_sources([DataSource(path=str(j))])[0].question == "Q?"
    t = tmp_path / "questions.json"
    t.write_bytes(b"\xef\xbb\xbf" + json.dumps([_rec()]).encode())
    assert sets.load_sources([DataSource(path=str(t))])[0].question == "Q?"


def test_header_row_is_skipped_even_behind_a_bom(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_bytes(b"\xef\xbb\xbfquestion,A,B,C,D,answer\n" + SMALL_CSV)
    recs = sets.load_sources([DataSource(path=str(f))])
    assert [r.question for r in recs] == ["What is 1+1?", "What is 2+2?", "What is 3+3?"]
    assert recs[0].origin == f"{f}:2"


# --- control characters ----------------------------------------------------------------------------------


@needs_mmlu
def test_nul_in_real_mmlu_question_is_refused(tmp_path: Path) -> None:
    lines = ALGEBRA.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"order", b"or\x00der", 1)
    f = tmp_path / "abstract_algebra_val.csv"
    f.write_bytes(b"\n".join(lines))
    msg = _load_error(f)
    assert f"{f}:2: question has control character U+0000 at character" in msg
    assert "only tab and newline are allowed" in msg


def test_control_characters_refused_tab_newline_kept(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [
        _rec("Tab\there,\nnewline?"),
        {"question": "Q?", "choices": ["a", "\u001b[31mred", "c"], "answer": "A"},
        {"question": "Q\u007f?", "choices": ["a", "b"], "answer": "A"},
        {"question": "Q?", "choices": ["a", "b"], "answer": "A", "explanation": "bell\u0007"},
        {"question": "Q\ud83d?", "choices": ["a", "b"], "answer": "A"},
        {"question": "Q?", "choices": ["a", "b"], "answer": "A", "topic": "x\u0000"},
    ])
    res = importers.import_source(DataSource(path=str(f)))
    assert [r.question for r in res.records] == ["Tab\there,\nnewline?"]
    assert res.problems[0] == (f"{f}:2: choice 2 has control character U+001B at character 1; remove it "
                               "(only tab and newline are allowed)")
    assert [p.split(": ", 1)[0] for p in res.problems] == [f"{f}:{i}" for i in range(2, 7)]
    assert "U+007F" in res.problems[1] and "explanation" in res.problems[2]
    assert "U+D83D" in res.problems[3] and "topic" in res.problems[4]


def test_crlf_inside_quoted_csv_field_becomes_newline(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_bytes(b'"Two\r\nlines?",a,b,c,d,A\r\nOne?,a,b,c,d,B\r\n')
    recs = sets.load_sources([DataSource(path=str(f))])
    assert [r.question for r in recs] == ["Two\nlines?", "One?"]
    assert recs[1].origin == f"{f}:3"


# --- sizes, empty files, ragged rows, answers, choice counts ---------------------------------------------


def test_huge_single_line_jsonl_is_a_bad_row_and_the_rest_imports(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [_rec("x" * (2 << 20)), _rec("Q2?")])
    res = importers.import_source(DataSource(path=str(f)))
    assert res.problems == [f"{f}:1: line longer than 1 MiB; each record is one JSON object on a line"]
    assert [(r.question, r.origin) for r in res.records] == [("Q2?", f"{f}:2")]


def test_huge_single_line_csv_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_bytes(SMALL_CSV + b"x," * (1 << 20) + b"A\n")
    assert f"{f}:4: line longer than 1 MiB" in _load_error(f)


def test_overlong_question_within_a_line(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [_rec("x" * 200_000)])
    assert _problems(f) == [f"{f}:1: question is 200000 characters long; at most {records.MAX_TEXT_CHARS}"]


@pytest.mark.parametrize(("name", "text"), [
    ("empty.csv", ""), ("blank.csv", "\n \n"), ("empty.jsonl", ""), ("empty.json", ""), ("list.json", " [ ] "),
])
def test_empty_files_are_reported(tmp_path: Path, name: str, text: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    (p,) = _problems(f)
    where, reason = p.split(": ", 1)
    assert where == f"{f}:1" and reason.startswith(("the file is empty", "the list holds no questions")), p


def test_header_only_csv_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_text("question,A,B,C,D,answer\n")
    assert _problems(f) == [f"{f}:1: the file holds only a header row, no questions"]


def test_ragged_csv_rows_are_named(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_bytes(SMALL_CSV + b"What is 1,000 + 1?,1001,1002,1003,1004,A\nshort,a,b\n")
    res = importers.import_source(DataSource(path=str(f)))
    assert len(res.records) == 3
    assert res.problems == [
        f"{f}:4: 7 fields where the file's rows have 6 (question, 4 choices, answer); "
        "quote fields that contain commas",
        f"{f}:5: 3 fields where the file's rows have 6 (question, 4 choices, answer); "
        "quote fields that contain commas",
    ]


def test_answer_out_of_range_and_extreme_choice_counts(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_text("Q?,a,b,c,d,E\n" + "Q2?," + "c," * 1000 + "A\n")
    assert _problems(f)[0] == f"{f}:1: answer E but only 4 choices"
    g = _jsonl(tmp_path / "q.jsonl", [
        {"question": "Q?", "choices": [f"c{i}" for i in range(20_000)], "answer": "A"},
        {"question": "Q?", "choices": ["a", "b"], "answer": 7},
        {"question": "Q?", "choices": ["a", "b"], "answer": 1.5},
        {"question": "Q?", "choices": [], "answer": "A"},
        {"question": "Q?", "choices": ["a", "b"], "answer": "Z" * 5000},
    ])
    assert _problems(g) == [
        f"{g}:1: needs 2-10 choices, got 20000",
        f"{g}:2: answer index 7 out of range for 2 choices",
        f"{g}:3: 'answer' must be a letter A-B or a 0-based index, got 1.5",
        f"{g}:4: needs 2-10 choices, got 0",
        f"{g}:5: answer 'ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ... is not a letter A-B",
    ]


def test_non_string_fields_are_refused(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [_rec(topic={"a": 1}), _rec(id=[[1]]), _rec(source=3)])
    assert [p.split(": ", 1)[1] for p in _problems(f)] == [
        "'topic' must be a string", "'id' must be a string or a number", "'source' must be a string"]


def test_mutated_real_files_never_raise_anything_but_data_error(tmp_path: Path) -> None:
    base = ALGEBRA.read_bytes() if ALGEBRA.exists() else SMALL_CSV * 20
    seeds = {".csv": base, ".jsonl": b"".join(json.dumps(_rec(f"Q{i}?")).encode() + b"\n" for i in range(30)),
             ".json": json.dumps([_rec(f"Q{i}?") for i in range(30)], indent=1).encode()}
    rng = random.Random(0)
    for n in range(150):
        ext = (".csv", ".jsonl", ".json")[n % 3]
        data = bytearray(seeds[ext])
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            op = rng.randrange(4)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                data[i:i] = rng.choice([b'"', b"\x00", b"\xef\xbb\xbf", b"[" * 50, b",", b"\r", b"\n"])
            elif op == 2:
                del data[i : i + rng.randint(1, 40)]
            else:
                data = data[:i]
        f = tmp_path / f"m{n}{ext}"
        f.write_bytes(bytes(data))
        try:
            sets.load_sources([DataSource(path=str(f))], max_bad_rows=10**9)
        except records.DataError as e:
            assert str(e).startswith(f"{f}") or f"{f}:" in str(e), str(e)


# --- duplicates in the manifest --------------------------------------------------------------------------


def test_prepare_lists_each_dropped_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [_rec(f"Q{i}?", topic="t") for i in range(20)])
    b = tmp_path / "b_val.csv"
    b.write_text("Unique?,a,b,c,A\nq3?,A,B,C,B\n\nunique?,a,b,c,C\n")
    job = job_from_data({"name": "prep", "kind": "prepare",
                         "data": {"train": [str(a), str(b)], "val_fraction": 0.2}})
    assert prepare.run(job, tmp_path / "run") == 0
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["duplicates"] == [f"{b}:2 duplicate of {a}:4", f"{b}:4 duplicate of {b}:1"]
    assert man["duplicates_removed"] == 2
    assert "dropped 2 duplicate records (see manifest.json)" in capsys.readouterr().out


def test_train_records_also_in_val_are_listed(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [_rec(f"Q{i}?") for i in range(6)])
    v = _jsonl(tmp_path / "v.jsonl", [_rec("Q4?"), _rec("q4?")])
    _, _, info = sets.train_val_records(DataSpec(train=[str(a)], val=[str(v)]))
    assert info["duplicates"] == [f"{v}:2 duplicate of {v}:1", f"{a}:5 duplicate of {v}:1"]


@needs_mmlu
def test_real_mmlu_duplicates_name_both_lines() -> None:
    val = sets.load_sources([DataSource(path=str(MMLU / "val"))])
    _, dropped = sets.dedupe_report(val)
    assert len(dropped) == 2
    for d in dropped:
        m = re.fullmatch(r"(.+_val\.csv):(\d+) duplicate of (.+_val\.csv):(\d+)", d)
        assert m, d
        lines = [Path(m[i]).read_text().split("\n")[int(m[i + 1]) - 1] for i in (1, 3)]
        firsts = [ln.lstrip('"').split(",")[0].lower()[:20] for ln in lines]
        assert firsts[0] == firsts[1], lines


def test_prepare_reports_a_garbage_file_without_a_traceback(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.csv"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(500))
    job = job_from_data({"name": "prep", "kind": "prepare", "data": {"train": [str(f)]}})
    assert prepare.run(job, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert f"{f}:1: not UTF-8 text (byte 0x89 at column 1)" in err and "Traceback" not in err
