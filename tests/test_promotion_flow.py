"""The promotion gate as a user meets it: the commands it names when a candidate and the alias holder share no
questions (run for real through the `runner` CLI), the gate deciding afterwards, warnings for a chance-level
first holder, `registry verify` over every version, and references written the wrong way round."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import test_registry
import yaml
from conftest import ROOT, run_cli
from train_helpers import tiny_job

from runner.registry import Registry
from runner.runs import RunStore
from runner.spec import job_from_data, load_job

LETTERS = "ABCD"
adapters = test_registry.adapters  # the session fixture: a saved random Qwen2 and two LoRA adapters on it


def val_rows(correct: int, n: int = 40, pred: str | None = None) -> list[dict[str, Any]]:
    """Per-question validation results as the trainer writes them beside a checkpoint (val_predictions.json)."""
    rows = []
    for i in range(n):
        gold = LETTERS[i % 4]
        p = pred or (gold if i < correct else LETTERS[(i + 1) % 4])
        rows.append({"id": f"val-{i}", "pred": p, "answer": gold, "correct": p == gold})
    return rows


def train_run(home: Path, adapters: dict[str, Path], job: str, rows: list[dict[str, Any]], *, seed: int = 0,
              adapter: str = "a1", **extra: Any) -> str:
    """A finished training run with one checkpoint (step-00000020: a real adapter, its validation results)."""
    data = {"kind": "train", "name": job, "model": {"base": str(adapters["base"])}, "lora": {"r": 4, "alpha": 8},
            "data": {"train": "builtin:categories", "seed": seed}, "train": {"steps": 20}, **extra}
    r = RunStore(home).create(job_from_data(data, f"jobs/{job}.yaml"))
    ck = r.checkpoints_dir / "step-00000020"
    shutil.copytree(adapters[adapter], ck / "adapter")
    acc = sum(x["correct"] for x in rows) / len(rows)
    (ck / "val_predictions.json").write_text(json.dumps({"step": 20, "predictions": rows}) + "\n")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 20, "val_accuracy": acc}) + "\n")
    r.metrics_path.write_text(json.dumps({"step": 20, "split": "val", "accuracy": acc, "n": len(rows)}) + "\n")
    r.set_state("running")
    r.set_state("succeeded", exit_code=0)
    return r.ref


def commands(stderr: str) -> list[list[str]]:
    """The `runner run ...` lines the gate printed, as argv."""
    return [shlex.split(ln.strip()) for ln in stderr.splitlines() if ln.strip().startswith("runner run ")]


def manifest(home: Path, name: str, v: int) -> dict[str, Any]:
    return json.loads((home / "registry" / name / f"v{v}" / "manifest.json").read_text())


# --- the whole flow, for real ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gate_names_eval_commands_that_work_and_then_decides(runner_home: Path, tmp_path: Path) -> None:
    """Two real training runs validate on different splits; the gate names the two eval commands, they run as
    printed, and the next promotion is decided by the gate (with McNemar), not by --force."""
    for name, seed in (("flow-a", 0), ("flow-b", 1)):
        job = tmp_path / f"{name}.yaml"
        job.write_text(yaml.safe_dump(tiny_job(name, data={"seed": seed},
                                               train={"steps": 6, "eval_every": 3, "save_every": 3})))
        p = run_cli("run", str(job), timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    first = run_cli("promote", "flow-a", "--to", "qa-agent", "--alias", "champion")
    assert first.returncode == 0, first.stderr
    # An untrained 1-layer model after 6 steps: its validation is guessing, and the first holder says so.
    assert "warning: qa-agent:v1, the first holder of @champion, is at chance level" in first.stderr
    assert manifest(runner_home, "qa-agent", 1)["promotion"]["warnings"]

    p = run_cli("promote", "flow-b", "--to", "qa-agent", "--alias", "champion")
    assert p.returncode == 1 and "same questions" in p.stderr and "Traceback" not in p.stderr
    cmds = commands(p.stderr)
    assert len(cmds) == 2, p.stderr
    run_b = RunStore(runner_home).get("flow-b")
    ck_b = run_b.checkpoints_dir / "best"
    assert cmds[0][:3] == ["runner", "run", "jobs/eval-gate.yaml"]  # a CPU job for a CPU candidate, not 72B
    assert f"run={run_b.ref}" in cmds[0] and f"checkpoint={ck_b.resolve().name}" in cmds[0]
    assert cmds[1][:3] == ["runner", "run", "jobs/eval-gate.yaml"] and "registry=qa-agent:v1" in cmds[1]
    assert Registry(runner_home).versions("qa-agent") == [1]
    for argv in cmds:
        e = run_cli(*argv[1:], timeout=900)
        assert e.returncode == 0, f"{shlex.join(argv)}\n{e.stdout[-3000:]}\n{e.stderr[-3000:]}"

    p = run_cli("promote", "flow-b", "--to", "qa-agent", "--alias", "champion")
    out = p.stdout + p.stderr
    assert "same questions" not in out and "Traceback" not in out
    assert "McNemar on 1542 paired questions" in out, out
    if p.returncode == 0:
        g = manifest(runner_home, "qa-agent", 2)["promotion"]["gate"]
        assert g["decision"] == "accepted" and g["eval_kind"] == "eval-run" and g["paired_test"]["n"] == 1542
        assert manifest(runner_home, "qa-agent", 2)["forced"] is False
    else:
        assert p.returncode == 1 and "refused: candidate accuracy" in p.stderr
        assert Registry(runner_home).versions("qa-agent") == [1]


# --- which commands the gate names -----------------------------------------------------------------------


def test_the_commands_fit_the_candidate_and_validate(runner_home: Path, adapters: dict[str, Path]) -> None:
    holder = train_run(runner_home, adapters, "cpu-a", val_rows(30))
    assert run_cli("promote", holder, "--to", "qa", "--alias", "champion").returncode == 0
    cpu = train_run(runner_home, adapters, "cpu-b", val_rows(32), seed=3, adapter="a2")
    rocm = train_run(runner_home, adapters, "rocm-b", val_rows(32), seed=4, adapter="a2", image="rocm",
                     backend="docker")
    for cand, job in ((cpu, "jobs/eval-gate.yaml"), (rocm, "jobs/eval-72b.yaml")):
        p = run_cli("promote", cand, "--to", "qa", "--alias", "champion")
        assert p.returncode == 1 and "same questions" in p.stderr and "Traceback" not in p.stderr
        cmds = commands(p.stderr)
        assert [c[2] for c in cmds] == [job, job], p.stderr
        assert f"run={cand}" in cmds[0] and "checkpoint=step-00000020" in cmds[0] and "registry=qa:v1" in cmds[1]
        for argv in cmds:  # every suggested override validates (plan writes nothing)
            pl = run_cli("plan", *argv[2:])
            assert pl.returncode == 0, f"{shlex.join(argv)}\n{pl.stderr}"
    # A checkpoint with no evaluation at all is pointed at the same job.
    bare = RunStore(runner_home).get(cpu)
    (bare.checkpoints_dir / "step-00000020" / "val_predictions.json").unlink()
    (bare.checkpoints_dir / "step-00000020" / "trainer_state.json").write_text("{}")
    bare.metrics_path.write_text("")
    p = run_cli("promote", cpu, "--checkpoint", "last", "--to", "qa")
    assert p.returncode == 1 and "no evaluation" in p.stderr
    (argv,) = commands(p.stderr)
    assert argv[2] == "jobs/eval-gate.yaml" and run_cli("plan", *argv[2:]).returncode == 0


def _eval_run(home: Path, job_file: Path, sets: list[str], target: dict[str, Any], correct: dict[str, bool]) -> None:
    """A succeeded eval run started from `job_file`, with the eval.json the eval workload writes."""
    r = RunStore(home).create(load_job(job_file, sets))
    preds = [{"id": q, "answer": "A", "pred": "A" if ok else "B", "correct": ok, "probs": {k: 0.25 for k in LETTERS}}
             for q, ok in correct.items()]
    (r.dir / "eval.json").write_text(json.dumps({
        "accuracy": sum(correct.values()) / len(correct), "n": len(correct), "eval_set": "ids-shared0001",
        "target": target, "predictions": preds}))
    r.set_state("running")
    r.set_state("succeeded", exit_code=0)


def test_a_holder_with_an_eval_run_needs_only_the_candidate_evaluated(runner_home: Path,
                                                                     adapters: dict[str, Path]) -> None:
    a = train_run(runner_home, adapters, "qa-a", val_rows(30))
    ck_a = RunStore(runner_home).get(a).checkpoints_dir / "step-00000020"
    _eval_run(runner_home, ROOT / "jobs" / "eval-gate.yaml", [f"run={a}", "checkpoint=step-00000020"],
              {"type": "run", "run_id": a.split("/")[1], "checkpoint": ck_a.name, "checkpoint_path": str(ck_a)},
              {f"q{i}": i < 20 for i in range(40)})
    assert run_cli("promote", a, "--to", "qa", "--alias", "champion").returncode == 0
    rec = next(e for e in manifest(runner_home, "qa", 1)["evals"] if e["kind"] == "eval-run")
    assert rec["job_file"] == str(ROOT / "jobs" / "eval-gate.yaml") and rec["questions"]["data"]

    b = train_run(runner_home, adapters, "qa-b", val_rows(34), seed=5, adapter="a2")
    p = run_cli("promote", b, "--to", "qa", "--alias", "champion")
    assert p.returncode == 1 and "The holder was evaluated on ids-shared0001" in p.stderr
    (argv,) = commands(p.stderr)
    assert argv == ["runner", "run", "jobs/eval-gate.yaml", "--set", f"run={b}", "--set", "checkpoint=step-00000020"]
    # Once the candidate has that evaluation, the gate decides on it.
    ck_b = RunStore(runner_home).get(b).checkpoints_dir / "step-00000020"
    _eval_run(runner_home, ROOT / argv[2], argv[4::2],
              {"type": "run", "run_id": b.split("/")[1], "checkpoint": ck_b.name, "checkpoint_path": str(ck_b)},
              {f"q{i}": i < 30 for i in range(40)})
    p = run_cli("promote", b, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    assert "0.7500" in p.stdout and "0.5000" in p.stdout and "McNemar on 40 paired questions" in p.stdout


# --- a first holder at chance level ----------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "why"), [
    (val_rows(0, pred="C"), "it answers C to every question (40 of 40)"),
    (val_rows(12), "accuracy 0.3000 (95% CI 0.1807-0.4543, n=40) is not above the chance rate 0.2500"),
])
def test_a_first_holder_at_chance_is_promoted_with_a_warning(runner_home: Path, adapters: dict[str, Path],
                                                             rows: list[dict[str, Any]], why: str) -> None:
    ref = train_run(runner_home, adapters, "qa-chance", rows)
    p = run_cli("promote", ref, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    assert "warning: qa:v1, the first holder of @champion, is at chance level" in p.stderr and why in p.stderr
    assert Registry(runner_home).resolve("qa@champion") == ("qa", 1)
    assert why in manifest(runner_home, "qa", 1)["promotion"]["warnings"][0]


def test_a_first_holder_above_chance_gets_no_warning(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = train_run(runner_home, adapters, "qa-good", val_rows(34))
    p = run_cli("promote", ref, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
    assert manifest(runner_home, "qa", 1)["promotion"]["warnings"] == []


# --- verify and references -------------------------------------------------------------------------------


def test_verify_name_checks_every_version(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = train_run(runner_home, adapters, "qa-v", val_rows(34))
    for _ in range(2):
        assert run_cli("promote", ref, "--to", "qa", "--alias", "champion").returncode == 0
    p = run_cli("registry", "verify", "qa")
    assert p.returncode == 0 and "qa:v1: ok" in p.stdout and "qa:v2 (@champion): ok" in p.stdout, p.stderr
    f = runner_home / "registry" / "qa" / "v1" / "source" / "job.yaml"
    f.chmod(0o644)
    f.write_text(f.read_text() + "# edited\n")
    p = run_cli("registry", "verify", "qa")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "qa:v1: 1 problem(s)" in p.stderr and "source/job.yaml: size" in p.stderr
    assert "qa:v2 (@champion): ok" in p.stdout and "1 of 2 versions ok" in p.stderr
    assert run_cli("registry", "verify", "qa@champion").returncode == 0


def test_a_version_written_as_an_alias_is_pointed_at_name_colon_version(runner_home: Path,
                                                                        adapters: dict[str, Path]) -> None:
    ref = train_run(runner_home, adapters, "qa-r", val_rows(34))
    assert run_cli("promote", ref, "--to", "qa-agent", "--alias", "champion").returncode == 0
    for args in (("registry", "verify", "qa-agent@v1"), ("registry", "show", "qa-agent@v1")):
        p = run_cli(*args)
        assert p.returncode == 2 and "qa-agent:v1" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_cli("registry", "show", "qa-agent@1")
    assert p.returncode == 2 and "qa-agent:v1" in p.stderr
    p = run_cli("registry", "ls", "qa-agent@champion")
    assert p.returncode == 2 and "only the name" in p.stderr and "qa-agent" in p.stderr
    p = run_cli("promote", ref, "--to", "qa-agent@champion")
    assert p.returncode == 2 and "--to qa-agent --alias champion" in p.stderr


# --- the shipped eval jobs -------------------------------------------------------------------------------


def test_the_shipped_checkpoint_evals_name_the_quickstart_run() -> None:
    quickstart = load_job(ROOT / "jobs" / "quickstart.yaml").name  # what `just run jobs/quickstart.yaml` creates
    for f in ("eval-checkpoint.yaml", "eval-gate.yaml"):
        assert load_job(ROOT / "jobs" / f).spec.run == quickstart, f  # type: ignore[attr-defined]
    members = load_job(ROOT / "jobs" / "eval-ensemble.yaml").spec.models  # type: ignore[attr-defined]
    assert [m.run for m in members if m.run] == [quickstart]


def test_replacing_an_eval_target_with_set_says_how() -> None:
    p = run_cli("plan", "jobs/eval-72b.yaml", "--set", "run=quickstart", "--set", "checkpoint=best")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "got `run`, `registry`" in p.stderr and "to keep `run` add --set registry=null" in p.stderr
    p = run_cli("plan", "jobs/eval-72b.yaml", "--set", "registry=null", "--set", "run=quickstart")
    assert p.returncode == 0, p.stderr
