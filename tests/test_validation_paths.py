"""Validation that knows what it can: a missing local data file fails `runner validate` (not the run), a path
marked `remote` is left to where the job runs, and fields added to the schema leave old spec hashes alone."""

from __future__ import annotations

from pathlib import Path

from runner.spec import load_job
from runner.spec.hashing import spec_hash
from tests.conftest import run_cli

JOB = """\
kind: train
name: paths
model: {{base: tiny}}
data:
  train: {train}
  val: [{{path: {val}{extra}}}]
"""


def _write(tmp: Path, train: str, val: str, extra: str = "") -> Path:
    p = tmp / "job.yaml"
    p.write_text(JOB.format(train=train, val=val, extra=extra))
    return p


def test_a_missing_data_file_fails_validation_at_its_line(tmp_path: Path) -> None:
    real = tmp_path / "train.jsonl"
    real.write_text('{"question": "q?", "choices": ["a", "b"], "answer": "A"}\n')
    r = run_cli("validate", str(_write(tmp_path, str(real), str(tmp_path / "nope.jsonl"))), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "job.yaml:6:" in r.stderr and "data.val.0.path: no such file or directory" in r.stderr, r.stderr
    assert "remote: true" in r.stderr and "Traceback" not in r.stderr


def test_preflight_and_plan_refuse_it_too_and_nothing_is_written(tmp_path: Path, runner_home: Path) -> None:
    f = _write(tmp_path, "builtin:quickstart", str(tmp_path / "gone.jsonl"))
    for cmd in ("plan", "preflight", "run"):
        r = run_cli(cmd, str(f), timeout=120)
        assert r.returncode == 2 and "no such file or directory" in r.stderr, (cmd, r.stdout, r.stderr)
    assert not (runner_home / "runs").exists()  # a refused job leaves no failed run behind


def test_remote_paths_and_variables_are_not_looked_for(tmp_path: Path) -> None:
    assert run_cli("validate", str(_write(tmp_path, "builtin:quickstart", "/cluster/val.jsonl",
                                          ", remote: true")), timeout=60).returncode == 0
    assert run_cli("validate", str(_write(tmp_path, "builtin:quickstart", "$DATA/val.jsonl")),
                   timeout=60).returncode == 0


def test_relative_paths_start_where_runner_runs(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "v.jsonl").write_text('{"question": "q?", "choices": ["a", "b"], "answer": "A"}\n')
    f = _write(tmp_path, "builtin:quickstart", "d/v.jsonl")
    assert run_cli("validate", str(f), cwd=tmp_path, timeout=60).returncode == 0
    r = run_cli("validate", str(f), cwd=tmp_path / "d", timeout=60)
    assert r.returncode == 2 and str(tmp_path / "d" / "d" / "v.jsonl") in r.stderr, r.stderr


def test_later_fields_at_their_default_keep_the_spec_hash(tmp_path: Path) -> None:
    job = load_job(_write(tmp_path, "builtin:quickstart", "builtin:quickstart"))
    data = job.stored_data()
    assert data["train"]["on_nonfinite"] == "stop" and data["data"]["val"][0]["remote"] is False
    old = {**data, "train": {k: v for k, v in data["train"].items() if k != "on_nonfinite"},
           "data": {**data["data"], "val": [{k: v for k, v in s.items() if k != "remote"} for s in data["data"]["val"]],
                    "train": [{k: v for k, v in s.items() if k != "remote"} for s in data["data"]["train"]]}}
    assert spec_hash(old) == job.spec_hash
    assert spec_hash({**data, "train": {**data["train"], "on_nonfinite": "skip"}}) != job.spec_hash
