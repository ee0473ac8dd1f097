"""MCQ importers, dedupe, split and the `prepare` kind, on the shared MMLU files and small hand-made files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import pytest

from runner.files import sha256_file
from runner.spec import job_from_data
from runner.spec.models import DataSource, DataSpec
from runner.workloads.data import importers, records, sets
from runner.workloads.data.builtin import NEW_TOPICS, TOPIC_NAMES, categories
from runner.workloads.recipes import prepare
from tests.conftest import ROOT, run_cli

MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"
if not MMLU.exists():
    MMLU = Path("/work/shared/data/mmlu")
needs_mmlu = pytest.mark.skipif(not MMLU.exists(), reason="shared MMLU files not present")


@needs_mmlu
def test_mmlu_val_and_dev_import_exactly() -> None:
    val = sets.load_sources([DataSource(path=str(MMLU / "val"))])
    dev = sets.load_sources([DataSource(path=str(MMLU / "dev"))])
    assert len(val) == 1542
    assert len(dev) == 285
    assert len({r.topic for r in val}) == 57
    assert all(len(r.choices) == 4 and r.answer in "ABCD" for r in val)
    aa = [r for r in val if r.topic == "abstract_algebra"]
    assert aa[0].question.startswith("The cyclic subgroup of Z_24") and aa[0].answer == "A"
    # quoted fields with embedded commas and newlines stay one record each
    assert any("," in c for r in aa for c in r.choices)
    assert any("\n" in r.question for r in dev)


@needs_mmlu
def test_mmlu_duplicates_found_by_dedupe() -> None:
    val = sets.load_sources([DataSource(path=str(MMLU / "val"))])
    unique, removed = sets.dedupe(val)
    assert removed == 2 and len(unique) == 1540


def test_bad_rows_reported_with_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "physics_val.csv"
    f.write_text('What is 1+1?,1,2,3,4,B\n"Multi\nline, with comma",a,b,c,d,Z\nonly,two\nOk?,x,y,z,w,D\n')
    with pytest.raises(records.DataError) as e:
        sets.load_sources([DataSource(path=str(f))])
    msg = str(e.value)
    assert f"{f}:2: answer 'Z'" in msg  # the record starting on line 2 (it spans lines 2-3)
    assert f"{f}:4: expected question" in msg
    recs = sets.load_sources([DataSource(path=str(f))], max_bad_rows=2)
    assert [r.question for r in recs] == ["What is 1+1?", "Ok?"]
    assert recs[0].topic == "physics"


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    rows = [
        {"question": "Q1?", "choices": ["a", "b"], "answer": "A", "topic": "t", "difficulty": "easy"},
        "not json",
        {"question": "Q2?", "choices": ["a"], "answer": "A"},
        {"question": "Q3?", "choices": ["A) x", "B) y", "C) z"], "answer": "C", "difficulty": "impossible"},
    ]
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    res = importers.import_source(DataSource(path=str(f)))
    assert len(res.records) == 1
    assert [p.split(": ", 1)[0] for p in res.problems] == [f"{f}:2", f"{f}:3", f"{f}:4"]


def test_arc_obqa_csqa_and_tournament(tmp_path: Path) -> None:
    arc = tmp_path / "ARC-Challenge-Dev.jsonl"
    arc.write_text(json.dumps({"id": "x1", "question": {"stem": "Which is a metal?", "choices": [
        {"text": "wood", "label": "1"}, {"text": "iron", "label": "2"}, {"text": "glass", "label": "3"}]},
        "answerKey": "2"}) + "\n")
    obqa = tmp_path / "obqa.jsonl"
    obqa.write_text(json.dumps({"id": "o1", "question_stem": "Sun is a", "choices": {
        "text": ["star", "planet"], "label": ["A", "B"]}, "answerKey": "A", "fact1": "the sun is a star"}) + "\n")
    csqa = tmp_path / "csqa.jsonl"
    csqa.write_text(json.dumps({"id": "c1", "question": {"question_concept": "dog", "stem": "A dog can", "choices": [
        {"label": "A", "text": "fly"}, {"label": "B", "text": "bark"}]}, "answerKey": "B"}) + "\n")
    tour = tmp_path / "questions.json"
    tour.write_text(json.dumps([{"topic": "Logic", "question": "2+2?", "choices": ["A) 3", "B) 4", "C) 5", "D) 6"],
                                 "answer": "B", "explanation": "sum"}], indent=2))
    got = {p.name: sets.load_sources([DataSource(path=str(p))]) for p in (arc, obqa, csqa, tour)}
    a = got[arc.name][0]
    assert (a.source, a.answer, a.choices, a.difficulty) == ("arc", "B", ["wood", "iron", "glass"], "hard")
    o = got[obqa.name][0]
    assert (o.source, o.answer, o.explanation) == ("openbookqa", "A", "the sun is a star")
    assert got[csqa.name][0].source == "commonsenseqa" and got[csqa.name][0].answer == "B"
    t = got[tour.name][0]
    assert t.choices == ["3", "4", "5", "6"] and t.answer == "B" and t.topic == "Logic"
    # a directory imports every data file inside
    assert len(sets.load_sources([DataSource(path=str(tmp_path))])) == 4


def test_dedupe_normalises_case_and_space() -> None:
    a = records.make_mcq(id="1", question="What  is X?", choices=["a", "b"], answer="A", topic="t", source="s")
    b = records.make_mcq(id="2", question="what is x?", choices=["A ", "b"], answer="B", topic="t", source="s")
    c = records.make_mcq(id="3", question="What is Y?", choices=["a", "b"], answer="A", topic="t", source="s")
    out, removed = sets.dedupe([a, b, c])
    assert [r.id for r in out] == ["1", "3"] and removed == 1


def test_split_is_deterministic_and_stratified() -> None:
    recs, _ = sets.dedupe(sets.load_sources([DataSource(path="builtin:categories")]))
    tr1, va1 = sets.split_records(recs, 0.1, seed=0)
    tr2, va2 = sets.split_records(list(reversed(recs)), 0.1, seed=0)
    assert {r.id for r in va1} == {r.id for r in va2}
    assert not {sets.dedupe_key(r) for r in tr1} & {sets.dedupe_key(r) for r in va1}
    per_topic = {t: sum(r.topic == t for r in va1) for t in TOPIC_NAMES}
    totals = {t: sum(r.topic == t for r in recs) for t in TOPIC_NAMES}
    assert all(abs(per_topic[t] - round(0.1 * totals[t])) <= 1 for t in TOPIC_NAMES)
    _, va3 = sets.split_records(recs, 0.1, seed=1)
    assert {r.id for r in va3} != {r.id for r in va1}


def test_builtin_set_is_deterministic_and_filterable() -> None:
    assert categories(per_topic=5) == categories(per_topic=5)
    recs = sets.load_sources([DataSource(path="builtin:categories", topics=NEW_TOPICS[:2], limit=50)])
    assert len(recs) == 50 and {r.topic for r in recs} <= set(NEW_TOPICS[:2])
    with pytest.raises(records.DataError, match="not found"):
        sets.load_sources([DataSource(path="builtin:categories", topics=["astrology"])])


def test_prepare_job_writes_split_and_manifest(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    rows = [{"question": f"Q{i}?", "choices": ["a", "b", "c"], "answer": "ABC"[i % 3],
             "topic": f"t{i % 2}", "difficulty": "easy"} for i in range(40)]
    rows.append(dict(rows[0]))  # a duplicate
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = job_from_data({"name": "prep", "kind": "prepare", "data": {"train": [str(src)], "val_fraction": 0.25}})
    assert prepare.run(job, tmp_path / "run") == 0
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["duplicates_removed"] == 1
    assert man["train"]["total"] + man["val"]["total"] == 40
    assert man["val"]["by_topic"] == {"t0": 5, "t1": 5}
    assert man["inputs"][0]["files"][0]["sha256"] == sha256_file(src)
    assert man["outputs"]["val.jsonl"]["sha256"] == sha256_file(tmp_path / "run" / "val.jsonl")
    assert len(importers.read_jsonl(tmp_path / "run" / "train.jsonl")) == 30


def test_val_sources_remove_leaks_from_train(tmp_path: Path) -> None:
    recs = categories(per_topic=20, topics=["tools"])
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:5]))
    spec = DataSpec(train=[str(tmp_path / "a.jsonl")], val=[str(tmp_path / "v.jsonl")])
    train, val, info = sets.train_val_records(spec)
    assert not {sets.dedupe_key(r) for r in train} & {sets.dedupe_key(r) for r in val}
    assert info["train_removed_as_in_val"] >= 5


def test_records_write_every_field_but_origin_in_field_order() -> None:
    r = records.make_mcq(id="1", question="Q?", choices=["a", "b"], answer="B", topic="t", source="s",
                         explanation="why", origin="f:1")
    names = [f.name for f in dataclasses.fields(records.MCQ) if f.name != "origin"]
    assert list(r.to_dict()) == names and r.to_dict()["choices"] is not r.choices
    assert records.MCQ.from_dict(r.to_dict(), default_id="x") == r


@pytest.mark.slow
def test_prepare_of_50000_records_takes_under_a_minute(tmp_path: Path, runner_home: Path) -> None:
    spec = importlib.util.spec_from_file_location("prepare_bench", ROOT / "bench" / "prepare_bench.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    data = tmp_path / "records.jsonl"
    bench.write_records(data, 50_000)
    job = tmp_path / "prep.yaml"
    job.write_text(bench.JOB.format(path=json.dumps(str(data))))
    t = time.perf_counter()
    r = run_cli("run", str(job), timeout=300)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(next((runner_home / "runs").rglob("manifest.json")).read_text())
    assert manifest["train"]["total"] + manifest["val"]["total"] + manifest["duplicates_removed"] == 50_000
    assert 500 <= manifest["duplicates_removed"] <= 1500  # the generator's ~2% duplicates are all found
    assert elapsed < 60, f"prepare of 50,000 records took {elapsed:.1f}s"
