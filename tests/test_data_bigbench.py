"""The BIG-bench importer on the real `logical_deduction` task files (tests/data/bigbench, a cut of BIG-bench's own,
see its README) and on hostile variants of them: every bad example a FILE:LINE problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.spec.models import DataSource
from runner.workloads.data import importers, records, sets
from tests.conftest import run_cli

TASK = Path(__file__).resolve().parent / "data" / "bigbench" / "logical_deduction"
THREE = TASK / "three_objects" / "task.json"


def _expected(path: Path) -> list[tuple[str, list[str], str]]:
    """(input, choices, letter of the choice scored 1) of each example, read straight from the file."""
    out = []
    for ex in json.loads(path.read_text())["examples"]:
        choices = list(ex["target_scores"])
        best = [c for c, s in ex["target_scores"].items() if s == 1]
        out.append((ex["input"], choices, "ABCDEFGHIJ"[choices.index(best[0])]))
    return out


def test_a_task_file_is_detected_and_each_example_becomes_a_question() -> None:
    assert importers.detect_format(THREE) == "bigbench"
    res = importers.import_source(DataSource(path=str(THREE)))
    assert res.problems == [] and res.files == [THREE]
    assert [(r.question, r.choices, r.answer) for r in res.records] == _expected(THREE)
    assert len(res.records) == 12 and {r.answer for r in res.records} == {"A", "B", "C"}
    first = res.records[0]
    assert (first.topic, first.source, first.id) == ("logical_deduction/three_objects", "bigbench",
                                                     "bigbench/logical_deduction/three_objects/1")
    # each record's origin is the line its example starts on, the line before its `input`
    lines = THREE.read_text().splitlines()
    for r in res.records:
        n = int(r.origin.rsplit(":", 1)[1])
        assert lines[n - 1].strip() == "{" and json.dumps(r.question) in lines[n], r.origin


def test_a_task_of_subtasks_reads_its_subtasks_as_a_folder_or_as_its_task_json() -> None:
    by_folder = importers.import_source(DataSource(path=str(TASK)))
    by_file = importers.import_source(DataSource(path=str(TASK / "task.json")))
    expected = _expected(TASK / "five_objects" / "task.json") + _expected(THREE)
    for res in (by_folder, by_file):
        assert res.problems == []
        assert sorted((r.question, r.choices, r.answer) for r in res.records) == sorted(expected)
        assert {r.topic for r in res.records} == {"logical_deduction/three_objects", "logical_deduction/five_objects"}
    assert sorted(by_folder.files) == sorted(by_file.files) and len(by_file.files) == 3
    assert all(len(r.choices) == 5 for r in by_folder.records if r.topic.endswith("five_objects"))


def _variant(tmp: Path, change: dict[int, object]) -> Path:
    """The three_objects task with some examples replaced (index -> new example)."""
    data = json.loads(THREE.read_text())
    for i, ex in change.items():
        data["examples"][i] = ex
    out = tmp / "variant" / "task.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=4) + "\n")
    return out


def test_examples_that_cannot_be_questions_are_reported_at_their_line(tmp_path: Path) -> None:
    eleven = {f"choice {i}": int(i == 3) for i in range(11)}
    f = _variant(tmp_path, {
        1: {"input": "Too many?", "target_scores": eleven},
        3: {"input": "Two right?", "target_scores": {"x": 1, "y": 1, "z": 0}},
        5: {"input": "Write a poem.", "target": "roses"},
        7: {"input": "Scored?", "target_scores": {"x": "1", "y": 0}},
        9: ["not", "an", "example"],
    })
    res = importers.import_source(DataSource(path=str(f)))
    assert len(res.records) == 7
    starts = [i + 1 for i, line in enumerate(f.read_text().splitlines()) if line.startswith("        {")
              or line.startswith("        [")]
    assert res.problems == [
        f"{f}:{starts[1]}: 11 choices; a question has at most 10 (A-J)",
        f"{f}:{starts[3]}: no single best choice: 2 choices (A, B) share the top score 1",
        f"{f}:{starts[5]}: no `target_scores`: a generative example (only `target`); only multiple-choice examples "
        "become questions",
        f"{f}:{starts[7]}: the score of choice 'x' is '1', not a number",
        f"{f}:{starts[9]}: an example must be a JSON object with `input` and `target_scores`",
    ]
    with pytest.raises(records.DataError, match=r"5 bad row\(s\) \(data.max_bad_rows is 4\)"):
        sets.load_sources([DataSource(path=str(f))], max_bad_rows=4)
    assert len(sets.load_sources([DataSource(path=str(f))], max_bad_rows=5)) == 7


def test_broken_task_files_are_problems_not_tracebacks(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.json").write_text('{"canary": "x", "examples": [\n  {"input": "q", "target_scores": {"a": 1, "b": 0}},\n'
                                '  {"input": "r", \n')
    (bad / "b.json").write_text('{"canary": "x", "name": "empty", "examples": []}')
    (bad / "c.json").write_text('{"canary": "x", "name": "parent", "keywords": []}')
    res = importers.import_source(DataSource(path=str(bad), format="bigbench"))
    assert res.records == []
    assert res.problems == [f"{bad / 'a.json'}:4: invalid JSON: Expecting property name enclosed in double quotes",
                            f"{bad / 'b.json'}:1: `examples` must be a non-empty list",
                            f"{bad / 'c.json'}:1: a BIG-bench task without `examples` (and no subtask folders)"]


def test_a_prepare_job_on_the_task_folder(tmp_path: Path, runner_home: Path) -> None:
    job = tmp_path / "bb.yaml"
    job.write_text(f"kind: prepare\nname: bigbench-prep\ndata:\n  train: [{json.dumps(str(TASK))}]\n"
                   "  val_fraction: 0.2\n")
    r = run_cli("run", str(job), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(next((runner_home / "runs").rglob("manifest.json")).read_text())
    assert manifest["train"]["total"] + manifest["val"]["total"] == 18
    assert manifest["val"]["by_topic"] == {"logical_deduction/five_objects": 1, "logical_deduction/three_objects": 2}
    assert manifest["train"]["by_source"] == {"bigbench": 15}
