"""`runner rm`, `runner gc` and the filters of `runner ls`, through the CLI as a user types them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from runner.runs import RunStore
from tests.conftest import run_cli
from tests.test_registry import adapters as adapters  # noqa: F401,F811  (a fixture)
from tests.test_registry import make_run


def _ls(*args: str) -> list[list[str]]:
    p = run_cli("ls", *args, check=True)
    return [ln.split() for ln in p.stdout.splitlines()[1:] if ln.strip()]


def test_rm_refuses_promoted_and_live_runs_and_hostile_refs(runner_home: Path, adapters: dict[str, Path]) -> None:
    promoted = make_run(runner_home, adapters, "qa", acc={10: 0.5, 20: 0.7})
    plain = make_run(runner_home, adapters, "qa", acc={10: 0.4, 20: 0.3})
    run_cli("promote", promoted, "--to", "qa-agent", check=True)

    p = run_cli("rm", promoted)
    assert p.returncode == 1 and "qa-agent:v1" in p.stderr and "--force" in p.stderr
    assert RunStore(runner_home).get(promoted).dir.is_dir()

    for bad in ("../../etc", "qa/../..", "/etc/passwd", "qa/x/y"):
        p = run_cli("rm", bad)
        assert p.returncode == 2 and "not a run reference" in p.stderr, (bad, p.stderr)

    # A link planted in the store that points outside it is not followed.
    outside = runner_home.parent / "precious"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "status.json").write_text(json.dumps({"state": "failed"}))
    os.symlink(outside, runner_home / "runs" / "qa" / "20990101-000000-dead")
    p = run_cli("rm", "qa/20990101-000000-dead", "--force")
    assert p.returncode == 2 and "not a run directory" in p.stderr and outside.is_dir()

    r = RunStore(runner_home).get(plain)
    with r.lock():  # a runner drives it: never removed, not even with --force
        p = run_cli("rm", plain, "--force")
    assert p.returncode == 1 and "cancel" in p.stderr and r.dir.is_dir()

    p = run_cli("rm", plain, check=True)
    assert f"removed {plain}" in p.stdout and not r.dir.exists()
    p = run_cli("rm", promoted, "--force", check=True)
    assert "forced" in p.stdout and not (runner_home / "runs" / promoted).exists()
    assert (runner_home / "registry" / "qa-agent" / "v1" / "manifest.json").is_file()


def test_gc_is_a_dry_run_until_yes_and_keeps_promoted_and_best(runner_home: Path, adapters: dict[str, Path]) -> None:
    best = make_run(runner_home, adapters, "qa", acc={10: 0.6, 20: 0.9})
    promoted = make_run(runner_home, adapters, "qa", acc={10: 0.5, 20: 0.7})
    loser = make_run(runner_home, adapters, "qa", acc={10: 0.2, 20: 0.3})
    other = make_run(runner_home, adapters, "other", acc={10: 0.4, 20: 0.5})
    run_cli("promote", promoted, "--to", "qa-agent", check=True)

    p = run_cli("gc", check=True)
    assert f"would remove {loser}" in p.stdout and "dry run: 1 of 4" in p.stdout
    assert f"keep   {best}: it is the best run" in p.stdout and f"keep   {promoted}: registry" in p.stdout
    assert f"keep   {other}" in p.stdout  # the best (the only) run of its own job
    assert (runner_home / "runs" / loser).is_dir()

    p = run_cli("gc", "--yes", check=True)
    assert "removed 1 of 4" in p.stdout
    assert not (runner_home / "runs" / loser).exists()
    assert all((runner_home / "runs" / ref).is_dir() for ref in (best, promoted, other))
    assert run_cli("gc", "../x").returncode == 2


def test_ls_filters_and_shows_the_best_beside_the_final_accuracy(runner_home: Path,
                                                                  adapters: dict[str, Path]) -> None:
    a = make_run(runner_home, adapters, "qa", acc={10: 0.8, 20: 0.6}, best=10)
    b = make_run(runner_home, adapters, "other", acc={10: 0.4, 20: 0.5})
    job = RunStore(runner_home).get(b).dir / "job.yaml"
    data = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**data, "tags": {"team": "blue"}}))
    st = RunStore(runner_home).get(b).dir / "status.json"
    st.write_text(json.dumps({**json.loads(st.read_text()), "state": "failed", "exit_code": 1}))

    rows = {r[0]: r for r in _ls()}
    ra = rows[a.split("/")[1]]
    assert ra[-3:] == ["0.600", "0.800", "@10"]  # final 0.600; best (what promote takes) 0.800 at step 10
    assert [r[1] for r in _ls("--tag", "team=blue")] == ["other"]
    assert _ls("--tag", "team=red") == []
    assert [r[1] for r in _ls("--state", "failed")] == ["other"]
    assert sorted(r[1] for r in _ls("--kind", "train")) == ["other", "qa"]
    assert _ls("--kind", "eval") == []
    bad = run_cli("ls", "--tag", "team")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
