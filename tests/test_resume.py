"""Exact resume after kill -9, torn checkpoints, retention and SIGTERM, on real training subprocesses."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from train_helpers import metrics, run_train, start_train, tiny_job, write_run_dir

from runner.workloads.training.checkpoints import complete_checkpoints


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    run_dir = write_run_dir(tmp_path_factory.mktemp("full"), tiny_job())
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    return run_dir


def _wait_for(path: Path, proc: object, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()  # type: ignore[attr-defined]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill9_then_resume_gives_identical_losses(tmp_path: Path, cache: Path, uninterrupted: Path) -> None:
    run_dir = write_run_dir(tmp_path / "run", tiny_job())
    proc = start_train(run_dir, cache)
    _wait_for(run_dir / "checkpoints" / "step-00000006", proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    step = complete_checkpoints(run_dir / "checkpoints")
    assert "resuming from step " in out
    resumed_at = int(out.split("resuming from step ")[1].split()[0])
    assert resumed_at >= 6
    want = {r["step"]: r["loss"] for r in metrics(uninterrupted, "train")}
    got = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
    assert sorted(got) == list(range(1, 13))  # no duplicated or missing lines after the resume
    for s in range(1, 13):
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    va = {r["step"]: r["accuracy"] for r in metrics(run_dir, "val")}
    assert va == {r["step"]: r["accuracy"] for r in metrics(uninterrupted, "val")}
    assert step[-1][0] == 12


def test_torn_checkpoint_is_never_picked(tmp_path: Path, cache: Path, uninterrupted: Path) -> None:
    import shutil

    job = tiny_job(train={"keep_checkpoints": 10})
    run_dir = write_run_dir(tmp_path / "run", job)
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    ck = run_dir / "checkpoints"
    # as if killed while writing step 9: a temp directory, and a step directory missing its final file
    shutil.rmtree(ck / "step-00000009")
    shutil.rmtree(ck / "step-00000012")
    (ck / ".tmp-step-00000009-4242" / "adapter").mkdir(parents=True)
    (ck / "step-00000012").mkdir()
    (ck / "step-00000012" / "optimizer.pt").write_bytes(b"\0" * 10)
    assert [s for s, _ in complete_checkpoints(ck)][-1] == 6
    rc, out = run_train(run_dir, cache)
    assert rc == 0, out
    assert "resuming from step 6" in out
    assert not (ck / ".tmp-step-00000009-4242").exists()
    want = {r["step"]: r["loss"] for r in metrics(uninterrupted, "train")}
    got = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in range(1, 13))


def test_retention_keeps_last_n_plus_best(uninterrupted: Path) -> None:
    ck = uninterrupted / "checkpoints"
    steps = [s for s, _ in complete_checkpoints(ck)]
    best = json.loads((ck / "best" / "trainer_state.json").read_text())
    assert (ck / "best").is_symlink()
    assert steps[-2:] == [9, 12]
    assert set(steps) == {9, 12} | {best["best_step"]}
    st = json.loads((ck / "step-00000012" / "trainer_state.json").read_text())
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt", "scheduler.pt",
              "rng.pt", "tokenizer/tokenizer.json"):
        assert (ck / "step-00000012" / f).exists(), f
    assert st["step"] == 12 and "composer" in st and st["base_model"] == "tiny"


def test_sigterm_checkpoints_and_exits_130(tmp_path: Path, cache: Path) -> None:
    run_dir = write_run_dir(tmp_path / "run", tiny_job(train={"steps": 400, "save_every": 1000, "eval_every": 1000}))
    proc = start_train(run_dir, cache)
    _wait_for(run_dir / "metrics.jsonl", proc)
    while not metrics(run_dir, "train"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    assert ckpts and 1 <= ckpts[-1][0] < 400
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(ckpts[-1][1] / "adapter")).r == 4
