"""Training against damaged checkpoints and non-finite numbers, on real training subprocesses."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from train_helpers import REPO, metrics, run_train, tiny_job, train_env, write_run_dir

from runner.workloads.training.checkpoints import complete_checkpoints, is_better, point_best
from runner.workloads.training.integrity import verify
from runner.workloads.training.nonfinite import MAX_SKIPS_IN_A_ROW

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def cache() -> Path:
    return Path(os.environ.get("RUNNER_TEST_CACHE", str(REPO / ".runner" / "cache")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A finished 12-step run keeping every checkpoint (steps 3, 6, 9, 12)."""
    run_dir = write_run_dir(tmp_path_factory.mktemp("finished"), tiny_job(train={"keep_checkpoints": 10}))
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    return run_dir


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}


def test_checkpoints_carry_a_manifest(finished: Path) -> None:
    for _, ck in complete_checkpoints(finished / "checkpoints"):
        files = json.loads((ck / "manifest.json").read_text())["files"]
        assert {ADAPTER, "optimizer.pt", "scheduler.pt", "rng.pt"} <= set(files)
        assert "trainer_state.json" not in files
        assert verify(ck)[1] is True


def test_damaged_checkpoints_are_passed_over_for_the_newest_intact_one(tmp_path: Path, cache: Path,
                                                                     finished: Path) -> None:
    run_dir = _copy(finished, tmp_path / "run")
    ck = run_dir / "checkpoints"
    _truncate(ck / "step-00000012" / ADAPTER)
    _garble(ck / "step-00000009" / "optimizer.pt")
    _truncate(ck / "step-00000006" / "trainer_state.json")
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    assert "Traceback" not in out
    assert f"step-00000012/{ADAPTER}: size " in out and "(truncated or overwritten)" in out
    assert "step-00000009/optimizer.pt: sha256 differs from manifest.json" in out
    assert "step-00000006/trainer_state.json: unreadable JSON (" in out
    assert "resuming from step 3" in out
    for s in (6, 9, 12):  # set aside, and the retrained checkpoints are whole again
        assert (ck / f"damaged-step-{s:08d}").is_dir()
        assert verify(ck / f"step-{s:08d}")[1] is True
    want, got = _losses(finished), _losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in range(1, 13)), (got, want)


def test_no_intact_checkpoint_starts_again_from_step_0(tmp_path: Path, cache: Path, finished: Path) -> None:
    run_dir = _copy(finished, tmp_path / "run")
    for _, ck in complete_checkpoints(run_dir / "checkpoints"):
        _truncate(ck / ADAPTER)
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    assert "Traceback" not in out and "resuming from step" not in out
    assert "warning: no intact checkpoint left: starting again from step 0" in out
    assert sorted(_losses(run_dir)) == list(range(1, 13))  # no lines left over from the first attempt
    assert [r["step"] for r in metrics(run_dir, "val")] == [0, 6, 12]
    assert _losses(run_dir) == _losses(finished)


def test_checkpoint_without_manifest_still_resumes(tmp_path: Path, cache: Path, finished: Path) -> None:
    """Checkpoints written before manifests existed: trusted as they are, but a file that cannot be read is
    named and its checkpoint passed over all the same."""
    run_dir = _copy(finished, tmp_path / "run")
    ck = run_dir / "checkpoints"
    for _, p in complete_checkpoints(ck):
        (p / "manifest.json").unlink(missing_ok=True)
    _garble(ck / "step-00000012" / "optimizer.pt")
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    assert "Traceback" not in out
    assert "step-00000012/optimizer.pt: unreadable (" in out
    assert "resuming from step 9" in out and "step-00000009 has no manifest.json" in out
    got, want = _losses(run_dir), _losses(finished)
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in range(1, 13))


def test_nonfinite_loss_fails_the_run(tmp_path: Path, runner_home: Path) -> None:
    job = tmp_path / "nan.yaml"
    job.write_text(yaml.safe_dump(tiny_job("nan-demo", train={"lr": 1e30})))
    p = run_cli("run", str(job), timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "error: loss is nan at step 2: lower train.lr (now 1e+30) or check the data" in out
    assert "Traceback" not in out
    (run,) = [d for d in (runner_home / "runs" / "nan-demo").iterdir() if d.is_dir()]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert "loss is nan at step 2" in (run / "run.log").read_text()
    assert not complete_checkpoints(run / "checkpoints")  # nothing trained on a NaN was saved


# Runs the train recipe with train.on_nonfinite set, whether or not the job schema declares the field yet.
SKIP_DRIVER = """
import os, sys
from pathlib import Path
from ruamel.yaml import YAML
from runner.spec import job_from_stored
from runner.workloads.recipes import train
run_dir = Path(os.environ["RUNNER_RUN_DIR"])
job = job_from_stored(YAML(typ="safe").load((run_dir / "job.yaml").read_text()))
job.spec.train = job.spec.train.model_copy(update={"on_nonfinite": "skip"})
sys.exit(train.run(job, run_dir))
"""


def test_skip_mode_skips_updates_and_a_nan_accuracy_is_never_best(tmp_path: Path, cache: Path) -> None:
    steps = MAX_SKIPS_IN_A_ROW + 2
    run_dir = write_run_dir(tmp_path / "run", tiny_job(train={"lr": 1e30, "steps": steps, "keep_checkpoints": 10}))
    p = subprocess.run([sys.executable, "-c", SKIP_DRIVER], cwd=REPO, env=train_env(run_dir, cache),
                       capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    # Step 1 is finite and blows the weights up; every later step is skipped until too many in a row.
    assert p.returncode == 1, out
    assert "Traceback" not in out
    assert "warning: loss is nan at step 2: skipped its update (1 step(s) skipped so far)" in out
    assert f"the {MAX_SKIPS_IN_A_ROW}th step in a row skipped" in out
    rows = metrics(run_dir, "train")
    assert [r["skipped_steps"] for r in rows] == list(range(MAX_SKIPS_IN_A_ROW))
    assert rows[0]["loss"] is not None and all(r["loss"] is None for r in rows[1:])
    ck = run_dir / "checkpoints"
    adapters = {s: (p / ADAPTER).read_bytes() for s, p in complete_checkpoints(ck)}
    assert sorted(adapters) == [3, 6, 9] and adapters[3] == adapters[6] == adapters[9]  # no update applied
    assert json.loads((ck / "step-00000009" / "trainer_state.json").read_text())["skipped_steps"] == 8
    val6 = [r for r in metrics(run_dir, "val") if r["step"] == 6]
    assert math.isnan(val6[0]["accuracy"])
    assert not (ck / "best").exists() and not (ck / "best").is_symlink()
    assert json.loads((ck / "step-00000009" / "trainer_state.json").read_text())["best_step"] is None


def test_best_never_points_at_a_nan_accuracy(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    for step, acc in ((3, 0.25), (6, float("nan"))):
        (ck / f"step-{step:08d}").mkdir(parents=True)
        (ck / f"step-{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step, "val_accuracy": acc}))
    point_best(ck, 3)
    point_best(ck, 6)
    assert os.readlink(ck / "best") == "step-00000003"
    assert not is_better(float("nan"), None) and not is_better(float("nan"), 0.1) and not is_better(None, 0.1)
    assert is_better(0.5, float("nan")) and is_better(0.5, None) and not is_better(0.5, 0.5)
