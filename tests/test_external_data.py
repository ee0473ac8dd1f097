"""Tables read with `datasets`: parquet, arrow and save_to_disk copies of a Hub set's layout, `columns` mappings,
bad rows as FILE:ROW, Hub ids that fail fast and clearly offline, validation that never imports `datasets`, and
spec hashes that the new source fields leave alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.spec import load_job
from runner.spec.models import DataSource
from runner.workloads.data import importers, records, sets
from tests.conftest import ROOT, run_cli

datasets = pytest.importorskip("datasets")

MMLU_VAL = Path("/work/shared/data/mmlu/val")
if not MMLU_VAL.exists():
    MMLU_VAL = ROOT.parent / "shared" / "data" / "mmlu" / "val"
needs_mmlu = pytest.mark.skipif(not MMLU_VAL.exists(), reason="shared MMLU files not present")
MMLU_COLUMNS = {"question": "question", "choices": "choices", "answer": "answer", "topic": "subject"}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache of the test's own, and offline: no test here may reach the network."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _hub_layout(recs: list[records.MCQ]) -> object:
    """`recs` as a Dataset in cais/mmlu's layout: question, subject, choices (a list), answer (a class label)."""
    features = datasets.Features({
        "question": datasets.Value("string"), "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.ClassLabel(names=list("ABCD")),
    })
    return datasets.Dataset.from_dict(
        {"question": [r.question for r in recs], "subject": [r.topic for r in recs],
         "choices": [r.choices for r in recs], "answer": ["ABCD".index(r.answer) for r in recs]}, features=features)


def _content(recs: list[records.MCQ]) -> list[tuple[object, ...]]:
    return [(r.question, tuple(r.choices), r.answer, r.topic) for r in recs]


@needs_mmlu
def test_mmlu_in_the_hub_layout_reads_as_its_csv_files_do(tmp_path: Path) -> None:
    csv = sets.load_sources([DataSource(path=str(MMLU_VAL))])
    ds = _hub_layout(csv)
    ds.to_parquet(str(tmp_path / "mmlu-val.parquet"))  # type: ignore[attr-defined]
    datasets.DatasetDict({"validation": ds, "dev": ds.select(range(5))}).save_to_disk(str(tmp_path / "saved"))  # type: ignore[attr-defined]
    shutil.copy(next((tmp_path / "saved" / "validation").glob("*.arrow")), tmp_path / "mmlu-val.arrow")
    for kw in ({"path": str(tmp_path / "mmlu-val.parquet")}, {"path": str(tmp_path / "mmlu-val.arrow")},
               {"path": str(tmp_path / "saved"), "split": "validation"}):
        got = sets.load_sources([DataSource(**kw, columns=MMLU_COLUMNS)])  # type: ignore[arg-type]
        assert _content(got) == _content(csv), kw
        assert len(got) == 1542 and len({r.topic for r in got}) == 57
    res = importers.import_source(DataSource(path=str(tmp_path / "saved"), split="validation", columns=MMLU_COLUMNS))
    assert res.records[9].origin == f"{tmp_path / 'saved'}[validation]:10"
    assert any(f.name.endswith(".arrow") for f in res.files)  # the manifest hashes the folder's files
    with pytest.raises(records.DataError, match="holds several splits; set `split:` to one of validation, dev"):
        importers.import_source(DataSource(path=str(tmp_path / "saved"), columns=MMLU_COLUMNS))
    with pytest.raises(records.DataError, match="has no split 'test'"):
        importers.import_source(DataSource(path=str(tmp_path / "saved"), split="test", columns=MMLU_COLUMNS))


@needs_mmlu
def test_a_prepare_job_on_a_parquet_file_auto_detects_it(tmp_path: Path, runner_home: Path) -> None:
    csv = sets.load_sources([DataSource(path=str(MMLU_VAL / "astronomy_val.csv"))])
    _hub_layout(csv).to_parquet(str(tmp_path / "astronomy.parquet"))  # type: ignore[attr-defined]
    job = tmp_path / "prep.yaml"
    job.write_text("kind: prepare\nname: parquet-prep\ndata:\n  train: [{path: astronomy.parquet, columns: "
                   "{topic: subject}}]\n  val_fraction: 0.25\n")
    r = run_cli("run", str(job), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads(next((runner_home / "runs").rglob("manifest.json")).read_text())
    assert manifest["train"]["total"] + manifest["val"]["total"] == len(csv) == 16
    assert manifest["train"]["by_topic"] == {"astronomy": 12}
    assert manifest["inputs"][0]["files"][0]["path"].endswith("astronomy.parquet")


def test_columns_map_any_layout_and_answers_of_every_kind(tmp_path: Path) -> None:
    # one column per choice, answers as a letter or the text of the right choice (as written, or case aside)
    rows = {"Q": ["2+2?", "Capital of France?", "Largest planet?"], "opt_a": ["3", "Rome", "Mars"],
            "opt_b": ["4", "Paris", "Jupiter"], "opt_c": ["5", "Oslo", None], "key": ["B", "paris ", "Jupiter"],
            "area": ["math", "geo", "astro"], "why": ["sum", None, "mass"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "wide.parquet"))
    cols = {"question": "Q", "choices": ["opt_a", "opt_b", "opt_c"], "answer": "key", "topic": "area",
            "explanation": "why"}
    got = sets.load_sources([DataSource(path=str(tmp_path / "wide.parquet"), columns=cols)])
    assert [(r.answer, r.choices[r.answer_index], r.topic) for r in got] == [
        ("B", "4", "math"), ("B", "Paris", "geo"), ("B", "Jupiter", "astro")]
    assert got[2].choices == ["Mars", "Jupiter"]  # an empty trailing choice column is left out
    assert got[0].explanation == "sum" and got[1].explanation is None
    # ARC's Hub layout: choices as {text, label}, answerKey a label; an int answer column; JSON Lines via datasets
    arc = [{"id": "Mercury_1", "question": "Which is a metal?", "answerKey": "2",
            "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]}}]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    a = sets.load_sources([DataSource(path=str(tmp_path / "arc.jsonl"), format="hf",
                                      columns={"answer": "answerKey", "id": "id"})])[0]
    assert (a.id, a.answer, a.choices) == ("Mercury_1", "B", ["wood", "iron", "glass"])


def test_bad_rows_name_file_and_row_and_count_against_max_bad_rows(tmp_path: Path) -> None:
    f = tmp_path / "mixed.parquet"
    datasets.Dataset.from_dict({
        "question": ["Fine?", "", "Out of range?", "Which?", "Fine too?", "Unknown?"],
        "choices": [["yes", "no"], ["a", "b"], ["a", "b"], ["B", "A"], ["x", "y", "z"], ["a", "b"]],
        "answer": ["A", "A", "G", "B", "z", "maybe"],
    }).to_parquet(str(f))
    res = importers.import_source(DataSource(path=str(f)))
    assert [r.answer for r in res.records] == ["A", "C"]
    assert res.problems == [
        f"{f}:2: missing or empty question (column 'question')",
        f"{f}:3: answer G but only 2 choices",
        f"{f}:4: answer 'B' is ambiguous: the letter B or choice A's text",
        f"{f}:6: answer 'maybe' is not a letter A-B, a 0-based index or the text of a choice",
    ]
    with pytest.raises(records.DataError) as e:
        sets.load_sources([DataSource(path=str(f))], max_bad_rows=3)
    assert "4 bad row(s) (data.max_bad_rows is 3)" in str(e.value) and f"{f}:6:" in str(e.value)
    assert len(sets.load_sources([DataSource(path=str(f))], max_bad_rows=4)) == 2
    # 0-based indices: a class label of -1 (no label) is a bad row; so is an index written as text
    g = tmp_path / "ints.parquet"
    datasets.Dataset.from_dict({"question": ["a?", "b?"], "choices": [["x", "y"], ["x", "y"]], "answer": [1, -1]}
                               ).to_parquet(str(g))
    res = importers.import_source(DataSource(path=str(g)))
    assert [r.answer for r in res.records] == ["B"]
    assert res.problems == [f"{g}:2: answer index -1 out of range for 2 choices"]
    h = tmp_path / "text-index.parquet"
    datasets.Dataset.from_dict({"question": ["a?"], "choices": [["x", "y"]], "answer": ["1"]}).to_parquet(str(h))
    assert importers.import_source(DataSource(path=str(h))).problems == [
        f"{h}:1: answer '1' is a number written as text; give 0-based indices as integers, or letters"]


def test_a_table_without_the_named_columns_says_which_it_has(tmp_path: Path) -> None:
    f = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"prompt": ["q?"], "options": [["a", "b"]], "label": [0]}).to_parquet(str(f))
    with pytest.raises(records.DataError) as e:
        importers.import_source(DataSource(path=str(f)))
    assert "no column 'question', 'choices', 'answer' (it has prompt, options, label); map its columns with " \
           "`columns:`" in str(e.value)
    recs = importers.import_source(DataSource(path=str(f), columns={"question": "prompt", "choices": "options",
                                                                     "answer": "label"})).records
    assert recs[0].answer == "A" and recs[0].id == "t/1"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(records.DataError, match="broken.parquet: cannot read it as a table"):
        importers.import_source(DataSource(path=str(tmp_path / "broken.parquet")))


def test_a_folder_of_files_and_a_saved_set_reads_the_set_as_one_table(tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "plain.jsonl").write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": "B"}) + "\n")
    datasets.Dataset.from_dict({"question": ["T?", "U?"], "choices": [["c", "d"], ["e", "f"]], "answer": [0, 1]}
                               ).save_to_disk(str(d / "saved"))
    res = importers.import_source(DataSource(path=str(d)))
    assert res.problems == [] and sorted(r.question for r in res.records) == ["Q?", "T?", "U?"]
    assert {f.name for f in res.files} >= {"plain.jsonl", "state.json", "dataset_info.json"}
    assert [r.origin for r in res.records if r.question == "U?"] == [f"{d / 'saved'}:2"]
    with pytest.raises(records.DataError, match="holds one table; `split:` names a split of a save_to_disk folder"):
        importers.import_source(DataSource(path=str(d / "saved"), split="train"))
    # with an explicit importer of another format, a folder reads as it always did: no tables
    assert [r.question for r in importers.import_source(DataSource(path=str(d), format="jsonl")).records] == ["Q?"]


def test_a_hub_id_offline_fails_at_once_saying_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    src = DataSource(hf="cais/mmlu", config="all", split="test", columns=MMLU_COLUMNS)
    t = time.monotonic()
    with pytest.raises(records.DataError) as e:
        importers.import_source(src)
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "local copy" in str(e.value) and "`path:" in str(e.value)
    # no offline setting but no network (a port nothing listens on): the same answer, not minutes of retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(records.DataError) as e:
        importers.import_source(src)
    assert "cannot connect to 127.0.0.1:9" in str(e.value) and "save_to_disk" in str(e.value)
    assert time.monotonic() - t < 20
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before  # offline was for those loads only


def test_a_prepare_job_of_a_hub_id_fails_offline_with_that_message(tmp_path: Path) -> None:
    job = tmp_path / "hub.yaml"
    job.write_text("kind: prepare\nname: hub-prep\ndata:\n  train: [{hf: cais/mmlu, config: all, split: test, "
                   "columns: {topic: subject}}]\n")
    assert run_cli("validate", str(job), timeout=60).returncode == 0  # nothing to look for here
    r = run_cli("run", str(job), timeout=300)
    assert r.returncode == 1 and "data source hf:cais/mmlu: the Hugging Face Hub cannot be used" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


BAD_SOURCES = [
    ("{hf: cais/mmlu, path: x.jsonl}", "data.train.0: give exactly one of `path`"),
    ("{split: test}", "data.train.0: give exactly one of `path`"),
    ('{hf: "../etc"}', "data.train.0.hf: '../etc' is not a Hub data set id"),
    ("{hf: cais/mmlu, format: jsonl}", "data.train.0.format: an `hf` source is read through `datasets`"),
    ("{path: PARQUET, split: test}", "data.train.0.split: PARQUET holds one table"),
    ("{path: PARQUET, config: all}", "data.train.0.config: `config` is for `hf` (Hub) sources"),
    ("{path: PARQUET, columns: {question: q, choises: c}}", "data.train.0.columns.choises: unknown key 'choises'; "
                                                           "did you mean 'choices'?"),
    ("{path: PARQUET, columns: {choices: [A]}}", "data.train.0.columns.choices: names 1 column; a question has 2-10"),
    ("{path: PARQUET, columns: {choices: [A, A]}}", "data.train.0.columns.choices: names a column twice"),
    ('{path: PARQUET, columns: {answer: ""}}', "data.train.0.columns.answer: '' is not a column name"),
    ("{path: PARQUET, format: mmlu_csv, columns: {}}", "data.train.0.columns: `columns` is for tables read through"),
    ("{path: 'builtin:quickstart', split: x}", "data.train.0.split: builtin:quickstart is a generated set"),
]


@pytest.mark.parametrize(("source", "message"), BAD_SOURCES)
def test_validation_reports_bad_source_fields_at_their_line(tmp_path: Path, source: str, message: str) -> None:
    parquet = tmp_path / "t.parquet"
    parquet.write_bytes(b"")  # validation only looks for the file
    job = tmp_path / "job.yaml"
    job.write_text("kind: prepare\nname: bad-source\ndata:\n  train:\n    - " + source.replace("PARQUET", str(parquet))
                   + "\n")
    r = run_cli("validate", str(job), timeout=60)
    assert r.returncode == 2 and f"{job}:5:" in r.stderr, r.stderr
    assert message.replace("PARQUET", str(parquet)) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_validating_never_imports_datasets(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("kind: prepare\nname: fast\ndata:\n  train: [{hf: cais/mmlu, split: test, columns: {topic: "
                   "subject}}, {path: 'builtin:quickstart'}]\n")
    code = ("import sys; from runner.spec import load_job; load_job(sys.argv[1]); "
            "print(sorted(m for m in ('datasets', 'pyarrow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(job)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


GOLDEN = """\
kind: prepare
name: golden-prep
data:
  train: [builtin:quickstart, {path: builtin:quickstart, topic: t, limit: 5, format: jsonl}]
  val: [{path: /cluster/v.jsonl, remote: true, topics: [a]}]
  max_bad_rows: 3
"""


def test_new_source_fields_at_their_defaults_keep_the_spec_hash(tmp_path: Path) -> None:
    f = tmp_path / "golden.yaml"
    f.write_text(GOLDEN)
    job = load_job(f)
    assert job.spec_hash == "6c7ff5a6e087637c"  # this job's hash before sources had hf, split, columns, ...
    assert job.stored_data()["data"]["train"][0]["columns"] is None
    # given, they count: the same source read with other columns, or another split, is another experiment
    hashes = set()
    for extra in ("", ", columns: {topic: subject}", ", columns: {topic: area}", ", split: test", ", split: dev"):
        f.write_text(GOLDEN.replace("/cluster/v.jsonl, remote: true", "/cluster/v, remote: true" + extra))
        hashes.add(load_job(f).spec_hash)
    assert len(hashes) == 5
