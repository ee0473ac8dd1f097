"""The run store: layout, the status state machine, events, locks and finding a run to resume."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from runner.runs import Run, RunError, RunStore
from runner.spec import load_job

JOB = "kind: train\nname: demo\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\n"


@pytest.fixture
def job(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "demo.yaml"
    p.write_text(JOB)
    return load_job(p)


def test_create_lays_out_the_run_directory(job, runner_home: Path) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    assert r.dir.parent == runner_home / "runs" / "demo"
    assert (r.dir / "job.yaml").read_text().count("spec_hash: " + job.spec_hash) == 1
    st = json.loads((r.dir / "status.json").read_text())
    assert st["state"] == "pending" and st["spec_hash"] == job.spec_hash
    events = [json.loads(x) for x in (r.dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "created"
    assert not any(p.name.endswith(".tmp") for p in r.dir.parent.iterdir())


def test_state_machine_records_every_transition(job) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    r.set_state("running")
    r.set_state("cancelled", exit_code=130)
    r.set_state("running")  # resumed
    r.set_state("succeeded", exit_code=0)
    with pytest.raises(RunError, match="cannot go from succeeded to running"):
        r.set_state("running")
    trans = [(e["from"], e["to"]) for e in map(json.loads, r.events_path.read_text().splitlines()) if e["event"] == "state"]
    assert trans == [("pending", "running"), ("running", "cancelled"), ("cancelled", "running"), ("running", "succeeded")]
    st = r.status()
    assert st["state"] == "succeeded" and st["exit_code"] == 0 and st["ended_at"]


def _hold_lock(run_dir: str, ready, release) -> None:  # type: ignore[no-untyped-def]
    with Run(Path(run_dir)).lock():
        ready.set()
        release.wait(10)


def test_lock_keeps_a_second_driver_out(job) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(r.dir), ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        assert r.is_locked()
        with pytest.raises(RunError, match="being driven by another runner process"):
            with r.lock():
                pass
    finally:
        release.set()
        proc.join(10)
    assert not r.is_locked()
    with r.lock():
        # flock belongs to an open file, not a process: a second open in the holder's own process sees it held too
        assert r.is_locked()


def test_find_resumable_only_unfinished_runs_of_the_same_spec(job, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = RunStore()
    a = store.create(job)
    a.set_state("running")
    a.set_state("failed", exit_code=1)
    assert store.find_resumable(job) == a or store.find_resumable(job).dir == a.dir
    other = tmp_path / "other.yaml"
    other.write_text(JOB + "train: {steps: 3}\n")
    assert store.find_resumable(load_job(other)) is None
    b = store.create(job)
    b.set_state("running")
    b.set_state("succeeded")
    assert store.find_resumable(job) is None  # the latest run of that spec finished


def test_get_by_id_prefix_job_name_and_errors(job) -> None:  # type: ignore[no-untyped-def]
    store = RunStore()
    r = store.create(job)
    assert store.get(r.id).dir == r.dir
    assert store.get("demo").dir == r.dir
    assert store.get(f"demo/{r.id}").dir == r.dir
    with pytest.raises(RunError, match="no run 'nope'"):
        store.get("nope")


def test_torn_status_is_rebuilt_from_the_events(job) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    r.set_state("running", runner_pid=123)
    r.set_state("failed", exit_code=1)
    want = r.status()
    (r.dir / "status.json").write_text("{not json")
    got = r.status()
    assert "status.json is unreadable" in got["rebuilt_from"]
    assert got["state"] == "failed" and got["exit_code"] == 1 and got["spec_hash"] == want["spec_hash"]
    assert (r.dir / "status.json").read_text() == "{not json"  # reading never writes
    r.set_state("running")  # the next write replaces the damaged file
    assert json.loads((r.dir / "status.json").read_text())["state"] == "running"
    assert "rebuilt_from" not in r.status()


def test_status_and_events_both_damaged_is_reported_not_crashed(job) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    (r.dir / "status.json").write_text("{not json")
    (r.dir / "events.jsonl").write_text("garbage\n")
    with pytest.raises(RunError, match="unreadable.*cannot rebuild it"):
        r.status()


def test_secrets_from_the_environment_never_reach_the_run_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from runner.spec import job_from_stored

    p = tmp_path / "s.yaml"
    p.write_text(JOB + "env:\n  HF_TOKEN: ${env:QA_TEST_TOKEN}\n")
    monkeypatch.setenv("QA_TEST_TOKEN", "tok-123456789")
    job = load_job(p)
    assert job.spec.env["HF_TOKEN"] == "tok-123456789"  # type: ignore[attr-defined]
    r = RunStore().create(job)
    stored = "".join(f.read_text() for f in r.dir.rglob("*") if f.is_file())
    assert "tok-123456789" not in stored and "${env:QA_TEST_TOKEN}" in (r.dir / "job.yaml").read_text()
    # Rotating the token is the same experiment, and a stored job resolves it again from the environment.
    monkeypatch.setenv("QA_TEST_TOKEN", "rotated-987654321")
    again = load_job(p)
    assert again.spec_hash == job.spec_hash
    assert job_from_stored(r.job_data()).spec.env["HF_TOKEN"] == "rotated-987654321"  # type: ignore[attr-defined]


def test_a_run_reference_outside_the_store_is_refused_before_it_touches_the_disk(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    victim = tmp_path / "victim"
    victim.mkdir()
    for ref in (f"../../../../../../{victim}", "../x", "demo/../../x", "a/b/c", "demo\n", ".hidden"):
        with pytest.raises(RunError, match="not a run reference"):
            RunStore().get(ref)
    p = run_cli("show", f"../../../../../../../..{victim}")
    assert p.returncode == 2 and "not a run reference" in p.stderr and "Traceback" not in p.stderr
    assert list(victim.iterdir()) == []


def test_reading_a_run_never_writes_a_lock_file(job) -> None:  # type: ignore[no-untyped-def]
    r = RunStore().create(job)
    assert not (r.dir / ".lock").exists()
    assert not r.is_locked()
    assert not (r.dir / ".lock").exists()
    RunStore().find_resumable(job)  # looks at every unfinished run's lock
    assert not (r.dir / ".lock").exists()


def test_damaged_status_files_are_named_and_listing_goes_on(job) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import run_cli

    good = RunStore().create(job)
    torn = RunStore().create(job)
    (torn.dir / "status.json").write_text('{"state": "runn')
    stringy = RunStore().create(job)
    (stringy.dir / "status.json").write_text('"running"')
    lost = RunStore().create(job)
    (lost.dir / "status.json").write_text('"running"')
    (lost.dir / "events.jsonl").unlink()
    assert "holds a JSON str, not an object" in stringy.status()["rebuilt_from"]
    with pytest.raises(RunError, match="holds a JSON str, not an object"):
        lost.status()
    p = run_cli("ls")
    assert p.returncode == 0, p.stderr
    assert good.id in p.stdout and torn.id in p.stdout and stringy.id in p.stdout and lost.id not in p.stdout
    assert f"{torn.ref}: state rebuilt from events.jsonl (status.json is unreadable" in p.stderr
    assert str(lost.dir / "status.json") in p.stderr and "skipped a run" in p.stderr
    assert "Traceback" not in p.stderr
    assert (torn.dir / "status.json").read_text() == '{"state": "runn'  # `runner ls` never writes


def test_a_name_with_a_trailing_newline_is_invalid(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    f = tmp_path / "nl.yaml"
    f.write_text('kind: train\nname: "b17b\\n"\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\n')
    p = run_cli("validate", str(f))
    assert p.returncode == 2 and f"{f}:2:" in p.stderr and "name" in p.stderr, p.stderr
