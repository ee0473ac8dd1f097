"""The job-file loader: every error class points at FILE:LINE:COL, and valid files resolve as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner.spec import SpecError, load_job
from tests.conftest import ROOT, run_cli

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): error: (?P<rest>.*)$")


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


GOOD = """\
kind: train
name: demo
model:
  base: tiny
data:
  train: builtin:quickstart
train:
  steps: 20
"""


def problems(path: Path, *sets: str) -> list[str]:
    with pytest.raises(SpecError) as ei:
        load_job(path, list(sets))
    return [str(p) for p in ei.value.problems]


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, "a.yaml", GOOD))
    assert job.kind == "train" and job.name == "demo"
    assert job.spec.train.steps == 20 and job.spec.lora.r == 16  # type: ignore[attr-defined]
    assert job.spec.data.train[0].path == "builtin:quickstart"  # type: ignore[attr-defined]


def test_misspelt_key_points_at_line_and_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "a.yaml", GOOD.replace("  steps: 20", "  stpes: 20"))
    (msg,) = problems(p)
    m = LINE.match(msg)
    assert m and m["line"] == "8" and m["col"] == "3"
    assert "train.stpes" in msg and "did you mean 'steps'" in msg


def test_a_check_across_fields_points_at_the_field_it_names(tmp_path: Path) -> None:
    # Whole-job checks (nodes vs backend, unique team names) name the field; the line is that field's.
    p = write(tmp_path, "a.yaml", "kind: prepare\nname: multi\ndata: {train: builtin:mcq}\nresources:\n"
              "  cpus: 2\n  nodes: 2\n")
    (msg,) = problems(p)
    assert msg.startswith(f"{p}:6:3: error: resources.nodes: resources.nodes=2 needs backend slurm or kubernetes")
    t = write(tmp_path, "t.yaml", "kind: tournament\nname: t\nteams:\n  - name: a\n    answer: {url: http://x}\n"
              "  - name: a\n    answer: {url: http://y}\n")
    (msg,) = problems(t)
    assert msg.startswith(f"{t}:3:1: error: teams: team names must be unique; repeated: a")


def test_fsdp_on_cpu_ranks_loads_and_refuses_compile_with_it(tmp_path: Path) -> None:
    text = GOOD + "resources:\n  processes: 2\n  strategy: fsdp\n"
    assert load_job(write(tmp_path, "a.yaml", text)).spec.resources.strategy == "fsdp"  # type: ignore[attr-defined]
    (msg,) = problems(write(tmp_path, "b.yaml", text.replace("  steps: 20", "  steps: 20\n  compile: true")))
    assert "train.compile" in msg and "drop train.compile or use strategy ddp" in msg, msg


def test_wrong_type(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "a.yaml", GOOD.replace("steps: 20", "steps: lots")))
    assert msg.startswith(f"{tmp_path}/a.yaml:8:3: error: train.steps:") and "integer" in msg and "'lots'" in msg


def test_missing_required_field_points_at_its_parent(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "a.yaml", GOOD.replace("  base: tiny\n", "  dtype: bf16\n")))
    assert ":3:1: error: model.base: required field is missing" in msg


def test_unknown_kind_suggests(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "a.yaml", GOOD.replace("kind: train", "kind: trian")))
    assert ":1:1: error: kind: unknown kind 'trian'; did you mean 'train'?" in msg


def test_invalid_yaml_has_position(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "a.yaml", "kind: train\nname: [unclosed\nmodel: {}\n"))
    m = LINE.match(msg)
    assert m and "invalid YAML" in msg and int(m["line"]) >= 2


def test_bad_extends_path(tmp_path: Path) -> None:
    (msg,) = problems(write(tmp_path, "a.yaml", "extends: base/nope.yaml\n" + GOOD))
    assert ":1:1: error: extends: file 'base/nope.yaml' not found" in msg


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, "base/x.yaml", "extends: y.yaml\n")
    write(tmp_path, "base/y.yaml", "extends: x.yaml\n")
    (msg,) = problems(write(tmp_path, "a.yaml", "extends: base/x.yaml\n" + GOOD))
    assert "extends cycle: a.yaml -> x.yaml -> y.yaml -> x.yaml" in msg


def test_extends_deep_merges_and_marks_errors_in_the_base(tmp_path: Path) -> None:
    write(tmp_path, "base/common.yaml", "train:\n  lr: 0.001\n  warmup_steps: 3\nlora:\n  rr: 4\n")
    p = write(tmp_path, "a.yaml", "extends: base/common.yaml\n" + GOOD)
    (msg,) = problems(p)
    assert msg.startswith(str(tmp_path / "base" / "common.yaml") + ":5:3: error: lora.rr: unknown key 'rr'")
    write(tmp_path, "base/common.yaml", "train:\n  lr: 0.001\n  warmup_steps: 3\n")
    job = load_job(p)
    t = job.spec.train  # type: ignore[attr-defined]
    assert (t.lr, t.warmup_steps, t.steps) == (0.001, 3, 20)


def test_set_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    p = write(tmp_path, "a.yaml", GOOD)
    job = load_job(p, ["train.steps=7", "lora.r=4", "train.packing=false"])
    t = job.spec.train  # type: ignore[attr-defined]
    assert t.steps == 7 and t.packing is False and job.spec.lora.r == 4  # type: ignore[attr-defined]
    (msg,) = problems(p, "train.stepz=3")
    assert msg.startswith("--set train.stepz:1:1: error: train.stepz: unknown key") and "did you mean 'steps'" in msg


def test_env_interpolation_and_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QA_TOKEN", "s3cret-value")
    monkeypatch.delenv("QA_MISSING", raising=False)
    text = GOOD + "env:\n  TOKEN: ${env:QA_TOKEN}\n  OTHER: ${env:QA_MISSING:-fallback}\n"
    job = load_job(write(tmp_path, "a.yaml", text))
    assert job.spec.env == {"TOKEN": "s3cret-value", "OTHER": "fallback"}  # type: ignore[attr-defined]
    assert "env.TOKEN" in job.secret_paths
    (msg,) = problems(write(tmp_path, "b.yaml", GOOD + "env:\n  T: ${env:QA_MISSING}\n"))
    assert ":10:3: error: env.T: environment variable QA_MISSING is not set" in msg


def test_spec_hash_ignores_key_order_and_comments(tmp_path: Path) -> None:
    a = load_job(write(tmp_path, "a.yaml", GOOD))
    reordered = "name: demo  # same job\ntrain:\n  steps: 20\nkind: train\ndata:\n  train: builtin:quickstart\nmodel:\n  base: tiny\n"
    b = load_job(write(tmp_path, "b.yaml", reordered))
    c = load_job(write(tmp_path, "c.yaml", GOOD), ["train.steps=21"])
    assert a.spec_hash == b.spec_hash != c.spec_hash


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    assert "the file is empty" in problems(write(tmp_path, "e.yaml", ""))[0]
    assert "must be a mapping" in problems(write(tmp_path, "l.yaml", "- a\n- b\n"))[0]


def test_validate_cli_one_line_per_problem_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", GOOD.replace("steps: 20", "steps: x").replace("base: tiny", "bsae: tiny"))
    p = run_cli("validate", str(bad), str(ROOT / "jobs" / "train-72b.yaml"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert all(LINE.match(x) for x in lines), p.stderr
    assert len(lines) == 3  # the misspelt key, the missing `base` it leaves behind, the wrong type
    assert "Traceback" not in p.stderr
    assert "train-72b.yaml: ok" in p.stdout


def test_every_shipped_job_validates_quickly() -> None:
    import subprocess
    import sys
    import time

    jobs = sorted(str(p) for p in (ROOT / "jobs").glob("*.yaml"))
    code = ("import sys, time; t=time.perf_counter(); from runner.cli import main; "
            "sys.argv=['runner','validate',*sys.argv[1:]]\n"
            "try:\n main()\nexcept SystemExit as e:\n"
            " assert 'torch' not in sys.modules, 'validate imported torch'\n"
            " print('elapsed', time.perf_counter()-t); sys.exit(e.code)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *jobs], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": ok (") == len(jobs)
    assert wall < 3.0  # generous for a shared 2-core machine; typically ~0.3 s


def test_schema_lists_every_kind() -> None:
    import json

    p = run_cli("schema", check=True)
    sch = json.loads(p.stdout)
    assert len(sch["oneOf"]) >= 2 and "TrainJob" in sch["$defs"]
    one = json.loads(run_cli("schema", "train", check=True).stdout)
    assert one["properties"]["model"] and "description" in one["properties"]["name"]


def test_the_kinds_table_names_each_model_by_its_own_kind() -> None:
    import typing

    from runner.spec import JOB_MODELS

    assert list(JOB_MODELS) == ["prepare", "train", "eval", "serve", "tournament"]
    for kind, model in JOB_MODELS.items():
        assert typing.get_args(model.model_fields["kind"].annotation) == (kind,)


SECTIONED = """\
kind: prepare
name: res
backend: slurm
data: {train: builtin:mcq}
resources:
  cpus: 2
  slurm:
    partition: gpu
    account: lab
    time: "01:00:00"
    container: pyxis
  kubernetes:
    namespace: llm
    storage_class: ceph
    storage_gb: 50
    volume_claim: nfs
  container:
    shm_gb: 32
    registry: registry.example.com/team
"""

FLAT = """\
kind: prepare
name: res
backend: slurm
data: {train: builtin:mcq}
resources:
  cpus: 2
  partition: gpu
  account: lab
  time: "01:00:00"
  slurm_container: pyxis
  namespace: llm
  storage_class: ceph
  storage_gb: 50
  volume_claim: nfs
  shm_gb: 32
  registry: registry.example.com/team
"""


def test_resources_sections_for_slurm_kubernetes_and_the_container(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, "a.yaml", SECTIONED))
    res = job.spec.resources  # type: ignore[attr-defined]
    assert (res.slurm.partition, res.slurm.account, res.slurm.time, res.slurm.container) == (
        "gpu", "lab", "01:00:00", "pyxis")
    assert (res.kubernetes.namespace, res.kubernetes.storage_class, res.kubernetes.storage_gb,
            res.kubernetes.volume_claim) == ("llm", "ceph", 50, "nfs")
    assert (res.container.shm_gb, res.container.registry) == (32, "registry.example.com/team")
    assert job.warnings == []
    p = write(tmp_path, "b.yaml", SECTIONED.replace("    container: pyxis", "    container: docker"))
    (msg,) = problems(p)
    assert msg.startswith(f"{p}:11:5: error: resources.slurm.container:")


def test_flat_resources_keys_still_load_with_a_warning_each(tmp_path: Path) -> None:
    new = load_job(write(tmp_path, "new.yaml", SECTIONED))
    p = write(tmp_path, "old.yaml", FLAT)
    old = load_job(p)
    assert old.spec == new.spec
    # The same spec hashes the same either way, and as it did before resources had sections (the value the
    # flat layout hashed to), so earlier runs still resume and compare as this spec.
    assert old.spec_hash == new.spec_hash == "0bcce5ec9596b376"
    warnings = [str(w) for w in old.warnings]
    assert warnings[0] == f"{p}:7:3: warning: resources.partition: moved to resources.slurm.partition"
    assert f"{p}:10:3: warning: resources.slurm_container: moved to resources.slurm.container" in warnings
    assert f"{p}:16:3: warning: resources.registry: moved to resources.container.registry" in warnings
    assert len(warnings) == 10
    # `runner validate` prints them and still exits 0.
    cli = run_cli("validate", str(p))
    assert cli.returncode == 0, cli.stderr
    assert f"{p}:7:3: warning: resources.partition: moved to resources.slurm.partition" in cli.stderr.splitlines()
    assert "old.yaml: ok (prepare res" in cli.stdout


def test_flat_keys_in_extends_and_set_and_stored_runs(tmp_path: Path) -> None:
    from ruamel.yaml import YAML

    from runner.spec import job_from_data

    # A flat key overrides the sectioned value of the file it extends, as the flat layout did.
    write(tmp_path, "base.yaml", "resources:\n  container:\n    shm_gb: 64\n  slurm: {partition: a}\n")
    p = write(tmp_path, "a.yaml", "extends: base.yaml\n" + FLAT.split("resources:")[0] + "resources:\n  shm_gb: 8\n")
    job = load_job(p, ["resources.partition=b"])
    res = job.spec.resources  # type: ignore[attr-defined]
    assert (res.container.shm_gb, res.slurm.partition) == (8, "b")
    assert [str(w) for w in job.warnings] == [
        f"{p}:7:3: warning: resources.shm_gb: moved to resources.container.shm_gb",
        "--set resources.partition:1:1: warning: resources.partition: moved to resources.slurm.partition",
    ]
    # A run stored before the sections (its job.yaml in the flat layout) loads as the same spec and hash.
    stored = YAML(typ="safe").load(FLAT)
    again = job_from_data(stored)
    assert again.warnings == [] and again.spec_hash == load_job(write(tmp_path, "n.yaml", SECTIONED)).spec_hash


def test_a_key_given_flat_and_in_its_section_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "a.yaml", SECTIONED.replace("  cpus: 2\n", "  cpus: 2\n  partition: cpu\n"))
    msgs = problems(p)
    assert msgs[0].startswith(f"{p}:7:3: error: resources.partition: resources.partition and "
                              "resources.slurm.partition are both given")


def test_an_unknown_image_is_an_error_at_validate_with_the_valid_names(tmp_path: Path) -> None:
    from runner.images import image_names
    from runner.spec import job_from_stored

    names = image_names()
    assert {"cpu", "cuda", "rocm"} <= set(names)
    p = write(tmp_path, "job.yaml", "kind: prepare\nname: img\nbackend: docker\ndata: {train: builtin:mcq}\n"
              "image: rocmm\n")
    cli = run_cli("validate", str(p))
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    (line,) = cli.stderr.strip().splitlines()
    assert line.startswith(f"{p}:5:1: error: image: unknown image 'rocmm' (valid: {', '.join(names)};")
    assert line.endswith("did you mean 'rocm'?")
    plan = run_cli("plan", str(p), "--backend", "docker")
    assert plan.returncode == 2 and "Traceback" not in plan.stderr and ":5:1: error: image:" in plan.stderr
    # Every defined image is valid, also through --set; a stored run is not checked (its images/ may differ).
    for name in names:
        assert load_job(p, [f"image={name}"]).spec.image == name  # type: ignore[attr-defined]
    (msg,) = problems(p, "image=gpu")
    assert msg.startswith("--set image:1:1: error: image: unknown image 'gpu'")
    stored = {**load_job(p, ["image=cpu"]).stored_data(), "image": "site-image"}
    assert job_from_stored(stored).spec.image == "site-image"  # type: ignore[attr-defined]


# --- hostile job files and --set values ------------------------------------------------------------------

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
) + "kind: train\nname: bomb\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_BOMB, "once YAML aliases are expanded"),
        ("kind: train\nname: deep\nx: " + "[" * 2000 + "]" * 2000 + "\n", "nested"),
        ("kind: train\nname: deep\nx:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(100)) + "\n",
         "nested more than 64 levels"),
        ("kind: train\nname: big\n" + "".join(f"k{i}: {i}\n" for i in range(120_000)), "a job file may be at most"),
    ],
    ids=["alias-bomb", "deep-flow", "deep-block", "huge"],
)
def test_hostile_yaml_is_refused_quickly_with_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    import time

    f = tmp_path / "hostile.yaml"
    f.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_job(f)
    assert time.perf_counter() - t0 < 1.0
    assert message in str(e.value) and str(f) in str(e.value)
    p = run_cli("validate", str(f))
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("data.train.5.path=x", "data.train has 1 item(s) (0-0); index 5 is out of range"),
        ("data.train.foo=1", "data.train is a list: address an item by its index"),
        ("data.train=[{path: x}", "is not valid YAML"),
        ("name={oops", "is not valid YAML"),
    ],
)
def test_bad_set_expressions_are_input_errors(tmp_path: Path, expr: str, message: str) -> None:
    f = tmp_path / "j.yaml"
    f.write_text("kind: train\nname: j\nmodel: {base: tiny}\ndata: {train: [{path: 'builtin:categories'}]}\n")
    with pytest.raises(SpecError, match=re.escape(message)):
        load_job(f, [expr])
    p = run_cli("plan", str(f), "--set", expr)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr and "--set" in p.stderr
