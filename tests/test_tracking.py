"""MLflow tracking against a real `mlflow server` (SQLite backend, loopback port): a tracked train run, the registry
mirrored with its alias, a dead server that never fails training, a resumed run that continues its MLflow run,
and the run's page in headless Chromium showing the metrics."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, run_cli

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]
ARTIFACTS = ROOT / ".runner" / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not answer in 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.log.close()

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("mlflow"))  # started by the first test that needs it up
    yield s
    s.stop()


def job(tmp_path: Path, uri: str, name: str, steps: int = 12, **train: Any) -> Path:
    data = {
        "name": name, "kind": "train", "tags": {"team": "blue"},
        "model": {"base": "tiny", "tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "pretrain_steps": 0}},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [{"path": "builtin:categories", "topics": ["tools", "kitchen"], "limit": 240}],
                 "val_fraction": 0.1},
        "train": {"steps": steps, "batch_size": 2, "max_seq_len": 128, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 6, "save_every": 6, "log_every": 2, "threads": 1, **train},
        "logging": {"mlflow": {"tracking_uri": uri, "experiment": "qa-tests"}},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def state_of(home: Path, name: str) -> dict[str, Any]:
    (d,) = list((home / "runs" / name).iterdir())
    return {"dir": d, **json.loads((d / "mlflow.json").read_text())} if (d / "mlflow.json").exists() else {"dir": d}


def test_dead_server_never_fails_training_and_track_sends_the_rows_later(
        tmp_path: Path, runner_home: Path, server: Server) -> None:
    p = job(tmp_path, server.uri, "trk-dead")  # nothing listens on the port yet
    t0 = time.monotonic()
    r = run_cli("run", str(p), timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MLflow at " + server.uri + " is unreachable" in r.stderr
    assert "`runner track " in r.stderr and "the run goes on" in r.stderr
    assert took < 120, f"a dead tracking server slowed the run to {took:.0f} s"
    st = state_of(runner_home, "trk-dead")
    assert "run_id" not in st
    rows = [ln for ln in (st["dir"] / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    down = run_cli("track", "trk-dead")
    assert down.returncode == 3 and "unreachable" in down.stderr

    server.start()
    up = run_cli("track", "trk-dead", check=True)
    assert f"{len(rows)} metric rows" in up.stdout
    st = state_of(runner_home, "trk-dead")
    c = server.client()
    run = c.get_run(st["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(st["run_id"], "val_accuracy")] == [0, 6, 12]


def test_tracked_run_promoted_and_seen_in_a_browser(tmp_path: Path, runner_home: Path, server: Server) -> None:
    server.start()
    p = job(tmp_path, server.uri, "trk-live")
    r = run_cli("run", str(p), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unreachable" not in r.stderr
    st = state_of(runner_home, "trk-live")
    c = server.client()
    run = c.get_run(st["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("trk-live/")
    assert run.data.params["train.steps"] == "12" and run.data.params["lora.r"] == "4"
    assert run.data.tags["team"] == "blue" and len(run.data.tags["runner.spec_hash"]) == 16
    assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["mlflow.source.git.commit"])
    assert Path(run.data.tags["runner.best_checkpoint"]).is_dir()
    rows = [json.loads(ln) for ln in (st["dir"] / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    want = [(m["step"], m["loss"]) for m in rows if m["split"] == "train"]
    got = [(m.step, round(m.value, 6)) for m in c.get_metric_history(st["run_id"], "train_loss")]
    assert got == [(s, round(v, 6)) for s, v in want] and len(got) == 6
    assert {a.path for a in c.list_artifacts(st["run_id"])} >= {"loss.png", "accuracy.png", "job.yaml"}

    pr = run_cli("promote", "trk-live", "--to", "qa-agent", "--alias", "champion", timeout=300)
    assert pr.returncode == 0, pr.stdout + pr.stderr
    assert "mlflow: qa-agent version 1, @champion" in pr.stdout
    mv = c.get_model_version_by_alias("qa-agent", "champion")
    assert mv.run_id == st["run_id"] and mv.tags["runner.registry_version"] == "qa-agent:v1"
    assert mv.tags["runner.run"] == run.info.run_name and mv.source.startswith(f"runs:/{st['run_id']}/registry/")
    assert Path(mv.tags["runner.registry_dir"], "manifest.json").is_file()

    # The run's page in a real browser: MLflow's UI is a JS app, so the DOM is read after it has rendered.
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: bash .ci/tracking-up.sh"
    url = f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{st['run_id']}"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1400,1800", "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(
        r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))))
    final_acc = [m for m in rows if m["split"] == "val"][-1]["accuracy"]
    assert "trk-live/" in text and "Metrics" in text, text[:2000]
    assert re.search(rf"val_accuracy {re.escape(f'{final_acc:g}')}\b", text), text[:3000]
    assert "train_loss" in text and "train.steps 12" in text
    shot = tmp_path / "mlflow-run.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "mlflow-run.png")
    print(f"screenshot of the MLflow run page: {shot} (copy: {ARTIFACTS / 'mlflow-run.png'})")


def test_resumed_run_continues_its_mlflow_run(tmp_path: Path, runner_home: Path, server: Server) -> None:
    server.start()
    p = job(tmp_path, server.uri, "trk-resume", steps=1500, save_every=50, eval_every=1500, log_every=10)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(p)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    end = time.monotonic() + 240
    while time.monotonic() < end:
        runs = runner_home / "runs" / "trk-resume"
        dirs = list(runs.iterdir()) if runs.is_dir() else []
        if dirs and (dirs[0] / "mlflow.json").exists() and list((dirs[0] / "checkpoints").glob("step-*")):
            break
        time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: checkpoint, then the run ends cancelled
    out, _ = proc.communicate(timeout=120)
    first = state_of(runner_home, "trk-resume")
    assert json.loads((first["dir"] / "status.json").read_text())["state"] == "cancelled", out
    c = server.client()
    assert c.get_run(first["run_id"]).info.status == "KILLED"
    r = run_cli("run", str(p), timeout=300)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    again = state_of(runner_home, "trk-resume")
    assert again["run_id"] == first["run_id"]
    run = c.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert max(m.step for m in c.get_metric_history(first["run_id"], "train_loss")) == 1500
    assert [m.step for m in c.get_metric_history(first["run_id"], "val_accuracy")][-1] == 1500
    exp = c.get_experiment_by_name("qa-tests")
    names = [x.info.run_name for x in c.search_runs([exp.experiment_id]) if x.info.run_name.startswith("trk-resume/")]
    assert len(names) == 1
