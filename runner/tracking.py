"""MLflow tracking, from the host side: a run's resolved job, tags, metrics (replayed from metrics.jsonl) and
artifacts, and the registry's promotions mirrored as model versions and aliases.

The run directory and the project's registry stay the source of truth; MLflow is the team's view of them. The
runner that drives a run (for every backend: it reads the same run directory the workload writes) sends what is
new every few seconds, so training never waits on a tracking server, and one that is down only delays the view:
`mlflow.json` in the run directory records the MLflow run id and how many metric rows were sent, and
`runner track RUN` sends the rest later. A resumed run continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.files import atomic_write
from runner.paths import runner_home

if TYPE_CHECKING:
    from runner.runs import Run

STATE_FILE = "mlflow.json"
REQUEST_TIMEOUT_S = 5  # per HTTP request to a tracking server; it is never retried while a run is driven
FOLLOW_EVERY_S = 5.0
ARTIFACTS = ("loss.png", "accuracy.png", "eval.json", "job.yaml", "status.json", "val_step0.json")
TERMINAL = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class TrackingError(Exception):
    """The tracking server or store could not be reached or refused a request."""


def default_uri() -> str:
    return f"sqlite:///{runner_home() / 'mlflow' / 'mlflow.db'}"


def settings(job_data: dict[str, Any]) -> dict[str, str] | None:
    """{"uri", "experiment"} when the job turns tracking on (`logging.mlflow`), else None."""
    cfg = (job_data.get("logging") or {}).get("mlflow")
    if not isinstance(cfg, dict):
        return None
    return {"uri": str(cfg.get("tracking_uri") or default_uri()),
            "experiment": str(cfg.get("experiment") or job_data.get("name") or "qa-runner")}


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested job as MLflow params: dotted keys, JSON values (lists stay one value)."""
    out: dict[str, str] = {}
    if isinstance(node, dict) and node:
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        text = node if isinstance(node, str) else json.dumps(node, sort_keys=True)
        out[prefix] = text[:MAX_PARAM_CHARS]
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def metric_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(name, value, step) for every finite number in metrics.jsonl rows: `train_loss`, `val_accuracy`, ..."""
    pts = []
    for row in rows:
        step, split = row.get("step"), row.get("split")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(split, str):
            continue
        for k, v in row.items():
            x = _number(v)
            if x is not None and k not in ("step", "time"):
                pts.append((f"{split}_{k}", x, step))
    return pts


def _client(uri: str) -> Any:
    # Short, unretried requests: a dead server costs a few seconds of the driving runner's time, never the run's.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines ("View run at ...") would fill run logs
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("mlflow is not installed (pip install 'mlflow>=3,<4')") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _git() -> dict[str, Any] | None:
    """The commit of the code that runs the job (this checkout), as the registry records it."""
    from runner.registry.promote import git_info

    return git_info()


def read_state(r: Run) -> dict[str, Any]:
    try:
        data = json.loads((r.dir / STATE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


class Tracker:
    """Sends one run's new params, metric rows and (at the end) artifacts to MLflow."""

    def __init__(self, r: Run, cfg: dict[str, str]):
        self.r, self.cfg = r, cfg
        self.warned = False
        self.lock = threading.Lock()

    def _warn(self, e: BaseException) -> None:
        if self.warned:
            return
        self.warned = True
        pending = len(self.r.metrics()) - int(read_state(self.r).get("rows", 0))
        print(f"runner: warning: MLflow at {self.cfg['uri']} is unreachable ({str(e).splitlines()[0][:200]}); "
              f"the run goes on, {max(pending, 0)} metric row(s) wait in {self.r.dir / 'metrics.jsonl'}; "
              f"`runner track {self.r.id}` sends them later", file=sys.stderr, flush=True)

    def sync(self, final: bool = False) -> bool:
        """Send what is new; True when MLflow holds everything the run directory has. Never raises."""
        with self.lock:
            try:
                self._sync(final)
                return True
            except Exception as e:  # any failure of a tracking server or store: warn once, keep the rows
                self._warn(e)
                return False

    def _save(self, state: dict[str, Any]) -> None:
        atomic_write(self.r.dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def _start(self, c: Any, state: dict[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param, RunTag

        job = self.r.job_data()
        name = self.cfg["experiment"]
        exp = c.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(name)
        st = self.r.status()
        tags = {"runner.run": self.r.ref, "runner.job": self.r.job_name, "runner.kind": str(st.get("kind", "")),
                "runner.spec_hash": str(job.get("spec_hash", "")), "runner.run_dir": str(self.r.dir),
                "mlflow.runName": self.r.ref}
        git = _git()
        if git:
            tags["mlflow.source.git.commit"] = str(git["commit"])
            tags["runner.git_dirty"] = str(bool(git["dirty"])).lower()
        source = next((e.get("source") for e in self.r.events() if e.get("event") == "created"), None)
        if source:
            tags["runner.job_file"] = str(source)
        for k, v in (job.get("tags") or {}).items():
            tags[str(k)] = str(v)
        run = c.create_run(exp_id, run_name=self.r.ref, tags=tags)
        state = {"uri": self.cfg["uri"], "experiment_id": exp_id, "run_id": run.info.run_id, "rows": 0}
        self._save(state)
        params = flatten({k: v for k, v in job.items() if k not in ("description", "tags")})
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            c.log_batch(state["run_id"], params=items[i:i + 100])
        c.log_batch(state["run_id"], tags=[RunTag("runner.params_logged", "true")])
        return state

    def _sync(self, final: bool) -> None:
        from mlflow.entities import Metric

        c = _client(self.cfg["uri"])
        state = read_state(self.r)
        if state.get("uri") != self.cfg["uri"] or not state.get("run_id"):
            state = self._start(c, state)
        elif state.get("ended"):  # a resumed run: the same MLflow run goes on
            c.update_run(state["run_id"], status="RUNNING")
            state["ended"] = False
            self._save(state)
        rows = self.r.metrics()
        start = min(int(state.get("rows", 0)), len(rows))  # a resume drops rows after its checkpoint
        pts = metric_points(rows[start:])
        ts = int(self.r.metrics_path.stat().st_mtime * 1000) if self.r.metrics_path.exists() else 0
        ms = [Metric(k, v, ts, s) for k, v, s in pts]
        for i in range(0, len(ms), 1000):
            c.log_batch(state["run_id"], metrics=ms[i:i + 1000])
        state["rows"] = len(rows)
        self._save(state)
        if not final:
            return
        from runner.run_views import plots

        plots(self.r, rows)
        for name in ARTIFACTS:
            if (self.r.dir / name).is_file():
                c.log_artifact(state["run_id"], str(self.r.dir / name))
        from runner.registry.evidence import _best_pointer

        best = _best_pointer(self.r)
        if best is not None:  # the adapter by reference: it stays in the run directory (and the registry)
            c.set_tag(state["run_id"], "runner.best_checkpoint", str(best))
        run_state = str(self.r.status().get("state", ""))
        if run_state in TERMINAL:
            c.set_terminated(state["run_id"], status=TERMINAL[run_state])
            state["ended"] = True
            self._save(state)


class Follower:
    """While a run is driven: a daemon thread that syncs every few seconds, then a last sync with artifacts."""

    def __init__(self, r: Run):
        cfg = settings(r.job_data())
        self.tracker = Tracker(r, cfg) if cfg else None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Follower:
        if self.tracker is not None:
            self.thread = threading.Thread(target=self._loop, name="mlflow-follow", daemon=True)
            self.thread.start()
        return self

    def _loop(self) -> None:
        assert self.tracker is not None
        while not self.stop.wait(FOLLOW_EVERY_S):
            self.tracker.sync()

    def __exit__(self, *exc: object) -> None:
        if self.tracker is None:
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=REQUEST_TIMEOUT_S * 4)
        if self.tracker.sync(final=True) and self.tracker.warned:
            print("runner: MLflow reachable again; the run is tracked in full", file=sys.stderr, flush=True)


def track_main(ref: str) -> int:
    """`runner track RUN`: send what MLflow lacks of a run (after a server was down, or for an older run)."""
    from runner.runs import RunError, RunStore

    try:
        r = RunStore().get(ref)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = settings(r.job_data())
    if cfg is None:
        print(f"error: {r.ref} does not turn tracking on; add `logging: {{mlflow: {{}}}}` to its job "
              "(or a tracking_uri) for the runs after it", file=sys.stderr)
        return 2
    t = Tracker(r, cfg)
    final = str(r.status().get("state")) in TERMINAL
    if not t.sync(final=final):
        return 3
    st = read_state(r)
    print(f"tracked {r.ref} in MLflow at {cfg['uri']}: run {st.get('run_id')}, {st.get('rows', 0)} metric rows")
    return 0


def mirror_promotion(run: Run, name: str, version: int, version_dir: Path, manifest: dict[str, Any],
                     alias: str | None) -> list[str]:
    """Register a registry version in MLflow's model registry (source: the immutable version directory, lineage
    as tags) and move the alias there too. Returns warnings; never raises: the project's registry already holds it."""
    cfg = settings(run.job_data())
    if cfg is None:
        return []
    try:
        c = _client(cfg["uri"])
        state = read_state(run)
        run_id = state.get("run_id") if state.get("uri") == cfg["uri"] else None
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(name, description="Mirrored from the qa-runner registry (its source of truth).")
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        src = manifest.get("source") or {}
        tags = {"runner.registry_version": f"{name}:v{version}", "runner.run": run.ref,
                "runner.checkpoint": str(src.get("checkpoint", "")), "runner.spec_hash": str(src.get("spec_hash", "")),
                "runner.registry_dir": str(version_dir)}
        git = manifest.get("git") or {}
        if isinstance(git, dict) and git.get("commit"):
            tags["mlflow.source.git.commit"] = str(git["commit"])
        ev = manifest.get("eval") or {}
        if isinstance(ev, dict) and _number(ev.get("accuracy")) is not None:
            tags["runner.accuracy"] = f"{float(ev['accuracy']):.4f}"
        if not run_id:
            return [f"warning: MLflow did not mirror {name}:v{version}: {run.ref} is not in MLflow yet; "
                    f"`runner track {run.id}` sends it, then promote again to mirror"]
        # The version's manifest goes with the MLflow run; the adapter stays in the registry, by reference.
        c.log_artifact(run_id, str(version_dir / "manifest.json"), artifact_path=f"registry/{name}/v{version}")
        mv = c.create_model_version(name, source=f"runs:/{run_id}/registry/{name}/v{version}", run_id=run_id,
                                    tags=tags, description=f"qa-runner {name}:v{version} from {run.ref}")
        if alias is not None:
            c.set_registered_model_alias(name, alias, mv.version)
        return [f"mlflow: {name} version {mv.version}" + (f", @{alias}" if alias else "")
                + f" at {cfg['uri']} (mirrors {name}:v{version})"]
    except Exception as e:  # the registry version is written and verified; MLflow is only its mirror
        return [f"warning: MLflow did not mirror {name}:v{version} ({str(e).splitlines()[0][:200]}); the registry "
                "holds it"]
