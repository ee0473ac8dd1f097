"""Hostile values in job files: whatever reaches a script, command line or manifest is validated, then quoted.

The first tests feed the values a hostile user tried (shell metacharacters in env keys, a newline in a Slurm
partition) and expect exit 2 naming the field; the last render every backend's files from values that are valid
but awkward (quotes, `$(...)`, newlines in env values) and run or parse them to show nothing escapes its quoting.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from runner.backends import plan_for
from runner.spec import load_job
from tests.conftest import run_cli

BASE = """\
kind: prepare
name: hostile
data:
  train: builtin:quickstart
"""


def validate(tmp: Path, text: str, *sets: str) -> tuple[int, str]:
    p = tmp / "job.yaml"
    p.write_text(text)
    cmd = ("plan", str(p), *[a for s in sets for a in ("--set", s)]) if sets else ("validate", str(p))
    r = run_cli(*cmd, timeout=60)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ('env:\n  "BAD KEY;touch /tmp/x": "1"\n', "env.BAD KEY;touch /tmp/x"),
        ('env:\n  "1ST": "1"\n', "env.1ST"),
        ('env:\n  "A=B": "1"\n', "env.A=B"),
        ('resources:\n  slurm:\n    partition: "gpu\\ntouch /tmp/x"\n', "resources.slurm.partition"),
        ('resources:\n  slurm:\n    partition: "gpu;id"\n', "resources.slurm.partition"),
        ('resources:\n  slurm:\n    account: "$(id)"\n', "resources.slurm.account"),
        ('resources:\n  slurm:\n    time: "1:00:00 --wrap=id"\n', "resources.slurm.time"),
        ('resources:\n  kubernetes:\n    namespace: "prod\\nkind: Secret"\n', "resources.kubernetes.namespace"),
        ('resources:\n  kubernetes:\n    volume_claim: "a b"\n', "resources.kubernetes.volume_claim"),
        ('resources:\n  kubernetes:\n    storage_class: "fast}"\n', "resources.kubernetes.storage_class"),
        ('resources:\n  container:\n    registry: "reg.io/x y"\n', "resources.container.registry"),
        ('mounts:\n  - {source: "/data:/etc", target: /data}\n', "mounts.0.source"),
        ('mounts:\n  - {source: /data, target: "rel/path"}\n', "mounts.0.target"),
        ('tags:\n  owner: "a\\u0007b"\n', "tags.owner"),
    ],
)
def test_values_that_reach_a_script_are_refused(tmp_path: Path, snippet: str, field: str) -> None:
    rc, out = validate(tmp_path, BASE + snippet)
    assert rc == 2, out
    assert field in out and "job.yaml:" in out, out


def test_a_set_override_is_held_to_the_same_patterns(tmp_path: Path) -> None:
    rc, out = validate(tmp_path, BASE, "resources.slurm.partition=gpu;reboot")
    assert rc == 2 and "resources.slurm.partition" in out, out


@pytest.mark.parametrize(
    "snippet",
    [
        "resources:\n  slurm: {partition: 'gpu,debug', account: team_a-1, time: 2-12:00:00}\n",
        "resources:\n  slurm: {time: '90'}\n",
        "resources:\n  slurm: {time: UNLIMITED}\n",
        "resources:\n  kubernetes: {namespace: ml-team, volume_claim: runs.shared, storage_class: fast-ssd}\n",
        "resources:\n  container: {registry: 'registry.example.com:5000/team/sub'}\n",
        "env: {_PRIVATE: x, HF_HOME: /cache/hf}\n",
    ],
)
def test_ordinary_values_still_validate(tmp_path: Path, snippet: str) -> None:
    rc, out = validate(tmp_path, BASE + snippet)
    assert rc == 0, out


@pytest.mark.parametrize(
    ("snippet", "hint"),
    [
        ("  lr: '3e-3'\n", "without quotes"),
        ("  steps: true\n", "not a number"),
        ("  batch_size: 2.0\n", "whole number"),
        ("  lr: .inf\n", "finite"),
        ("  max_grad_norm: .nan\n", "finite"),
        ("  packing: 'yes'\n", "true or false"),
    ],
)
def test_numbers_and_booleans_are_strict(tmp_path: Path, snippet: str, hint: str) -> None:
    text = "kind: train\nname: strict\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\ntrain:\n" + snippet
    rc, out = validate(tmp_path, text)
    assert rc == 2 and hint in out and ":6:" in out, out


def test_unquoted_scientific_notation_is_a_number(tmp_path: Path) -> None:
    text = "kind: train\nname: strict\nmodel: {base: tiny}\ndata: {train: builtin:quickstart}\ntrain: {lr: 3e-4}\n"
    rc, out = validate(tmp_path, text)
    assert rc == 0, out


AWKWARD = {
    "QUOTE": "it's \"quoted\"",
    "SUBST": "$(touch {canary}) `touch {canary}` ${{HOME}}",
    "LINES": "first\nsecond; touch {canary}",
    "GLOB": "* ? [a] ~ & | > <",
}


def _awkward_job(tmp: Path, backend: str) -> tuple[object, Path]:
    canary = tmp / "canary"
    env = {k: v.format(canary=canary) for k, v in AWKWARD.items()}
    p = tmp / "job.yaml"
    p.write_text(BASE + "env: " + json.dumps(env) + "\ndescription: " + json.dumps("$(touch " + str(canary) + ")\nx")
                 + "\ntags: " + json.dumps({"note": "a'b\"c $(id)"}) + "\n")
    return plan_for(load_job(p, [], backend), backend), canary


def test_slurm_script_exports_env_values_verbatim(tmp_path: Path) -> None:
    plan, canary = _awkward_job(tmp_path, "slurm")
    script = plan.files["sbatch.sh"]  # type: ignore[attr-defined]
    start = script.index("\nexport ") + 1
    exports = script[start:script.index("\nexport RUNNER_NNODES=")]  # the job's env block, multi-line values too
    # Run the script's own export lines, then print what the variables hold.
    probe = exports + "\n" + "".join(f'printf "%s\\0" "${k}"\n' for k in AWKWARD)
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    got = out.stdout.split("\0")[:-1]
    assert got == [v.format(canary=canary) for v in AWKWARD.values()]
    assert not canary.exists()
    f = tmp_path / "sbatch.sh"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)


def test_docker_run_script_quotes_every_value(tmp_path: Path) -> None:
    plan, canary = _awkward_job(tmp_path, "docker")
    script = plan.files["docker-run.sh"]  # type: ignore[attr-defined]
    # Put a `docker` first on PATH that prints its arguments, one per NUL, and run the script for real.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    (bin_dir / "docker").chmod(0o755)
    f = tmp_path / "docker-run.sh"
    f.write_text(script)
    out = subprocess.run(["bash", str(f)], capture_output=True, text=True,
                         env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNNER_RUN_DIR": str(tmp_path / "run"),
                              "RUNNER_CACHE": str(tmp_path / "cache")})
    args = out.stdout.split("\0")
    assert not canary.exists()
    for k, v in AWKWARD.items():
        assert f"{k}={v.format(canary=canary)}" in args, (k, out.stdout, out.stderr)


def test_kubernetes_manifests_carry_values_as_data(tmp_path: Path) -> None:
    plan, canary = _awkward_job(tmp_path, "kubernetes")
    docs = [d for text in plan.files.values() if text.lstrip().startswith(("apiVersion", "#", "---"))  # type: ignore[attr-defined]
            for d in yaml.safe_load_all(text.replace("${RUN}", "r1")) if isinstance(d, dict) and "kind" in d]
    job = next(d for d in docs if d["kind"] == "Job")
    env = {e["name"]: e.get("value") for c in job["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    for k, v in AWKWARD.items():
        assert env[k] == v.format(canary=canary)
    assert {d["kind"] for d in docs} >= {"Job", "Service", "ConfigMap"}
