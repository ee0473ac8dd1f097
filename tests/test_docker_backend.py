"""Docker backend: the rendered `docker run` equivalent, environment checks, and a real engine end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from runner.backends import plan_for
from runner.backends.base import EXIT_CANCELLED, EnvironmentProblem
from runner.backends.devices import amd_device_flags, kfd_render_minors
from runner.backends.docker import (
    LABEL_RUN,
    DockerBackend,
    client,
    container_spec,
    find_orphans,
)
from runner.spec import load_job
from tests.conftest import MMLU, ROOT, run_cli

JOB_72B = str(ROOT / "jobs" / "train-72b.yaml")


def test_plan_shows_every_amd_flag_and_the_dockerfile() -> None:
    p = run_cli("plan", JOB_72B, env={"HF_TOKEN": "hf_supersecret_value"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "FROM rocm/pytorch:rocm6.2" in out
    assert "# file: plan/docker-run.sh" in out and "# file: plan/accelerate.yaml" in out
    for flag in ("--device /dev/kfd", "--device /dev/dri/renderD128", "--group-add video", "--ipc=host",
                 "--shm-size 64g", "--cap-add SYS_PTRACE", "--security-opt seccomp=unconfined", '--user "$user"',
                 '-v "$run_dir":/workspace/run:rw', "/workspace/cache:rw", "--label qa-runner.run-id=",
                 "--init"):
        assert flag in out, flag
    assert "hf_supersecret_value" not in out
    assert "-e HF_TOKEN \\" in out  # passed through from the environment, never written down


def test_run_script_is_valid_shell_and_quotes_values(tmp_path: Path) -> None:
    job = load_job(JOB_72B, ["env.MSG=it's a \"quoted\" $value"])
    plan = plan_for(job, "docker")
    script = plan.files["docker-run.sh"]
    f = tmp_path / "docker-run.sh"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)
    # Run it with a fake `docker` that prints its arguments: the values arrive intact.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    (fake / "docker").chmod(0o755)
    run_dir = tmp_path / "runs" / "train-72b" / "20260101-000000-abcd"
    (run_dir / "plan").mkdir(parents=True)
    (run_dir / "plan" / "docker-run.sh").write_text(script)
    out = subprocess.run(["bash", str(run_dir / "plan" / "docker-run.sh")], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, check=True).stdout.splitlines()
    assert "MSG=it's a \"quoted\" $value" in out
    assert f"{run_dir}:/workspace/run:rw" in out
    assert "qa-runner-train-72b-20260101-000000-abcd" in out
    assert f"{os.getuid()}:{os.getgid()}" in out


def test_amd_devices_are_per_gpu_render_nodes(tmp_path: Path) -> None:
    topo = tmp_path / "nodes"
    for i, (simd, minor) in enumerate([(0, 0), (304, 136), (304, 128), (304, 144)]):
        (topo / str(i)).mkdir(parents=True)
        (topo / str(i) / "properties").write_text(f"cpu_cores_count 0\nsimd_count {simd}\ndrm_render_minor {minor}\n")
    minors = kfd_render_minors(topo)
    assert minors == [136, 128, 144]  # KFD node order, CPU node skipped
    flags = amd_device_flags(2, minors)
    assert flags["devices"] == ["/dev/kfd", "/dev/dri/renderD136", "/dev/dri/renderD128"]
    assert flags["ipc_mode"] == "host" and flags["cap_add"] == ["SYS_PTRACE"]
    assert flags["security_opt"] == ["seccomp=unconfined"] and flags["group_add"] == ["video"]
    assert amd_device_flags(0)["devices"] == ["/dev/kfd", "/dev/dri"]


def test_cuda_flavour_requests_gpus_and_tiny_training_has_no_network() -> None:
    job = load_job(JOB_72B, ["image=cuda", "resources.gpu_type=h100", "resources.gpus=2"])
    spec = container_spec(plan_for(job, "docker"), "/r", "id")
    assert spec.gpu_request == 2 and spec.devices == [] and spec.ipc_mode == "host"
    assert "--gpus" in spec.docker_args() and spec.sdk_kwargs()["device_requests"][0]["Count"] == 2
    assert spec.network is None  # a Hub model must be downloaded
    tiny = load_job(JOB_72B, ["model.base=tiny", "image=cpu", "resources.gpus=0"])
    spec = container_spec(plan_for(tiny, "docker"), "/r", "id")
    assert spec.network == "none" and not spec.devices and spec.ipc_mode is None


def test_every_offline_base_runs_with_no_network_and_finds_the_mounted_cache(tmp_path: Path) -> None:
    for base in ("tiny", "smollm2-135m"):
        train = load_job(JOB_72B, [f"model.base={base}", "image=cpu", "resources.gpus=0"])
        spec = container_spec(plan_for(train, "docker"), "/r", "id", cache_dir=str(tmp_path))
        assert spec.network == "none", base
        assert (str(tmp_path), "/workspace/cache", False) in spec.binds
        assert spec.env["RUNNER_CACHE"] == "/workspace/cache"
    ensemble = load_job(str(ROOT / "jobs" / "eval-ensemble.yaml"), ["backend=docker", "image=cpu"])
    assert container_spec(plan_for(ensemble, "docker"), "/r", "id").network == "none"
    hub_member = load_job(str(ROOT / "jobs" / "eval-ensemble.yaml"),
                          ["backend=docker", "image=cpu", "models.2.model.base=Qwen/Qwen2.5-0.5B"])
    assert container_spec(plan_for(hub_member, "docker"), "/r", "id").network is None  # it downloads


def test_the_host_s_offline_base_table_matches_the_workload_s(tmp_path: Path) -> None:
    from runner.spec.models import HOST_BUILT_BASES, OFFLINE_BASE_MARKERS
    from runner.workloads.model import smollm2, tiny
    from runner.workloads.model.loading import OFFLINE_BASES

    assert set(OFFLINE_BASE_MARKERS) == set(OFFLINE_BASES) and set(HOST_BUILT_BASES) <= set(OFFLINE_BASES)
    for base, is_built in (("tiny", tiny.is_built), ("smollm2-135m", smollm2.is_built)):
        d = tmp_path / base
        d.mkdir()
        assert not is_built(d)
        (d / OFFLINE_BASE_MARKERS[base]).write_text("{}")
        assert is_built(d), f"{base}: a build is complete once it holds {OFFLINE_BASE_MARKERS[base]}"


def test_a_base_the_container_cannot_build_must_be_built_on_the_host_first(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # the check comes before the engine
    job = load_job(JOB_72B, ["model.base=smollm2-135m", "image=cpu", "resources.gpus=0"])
    with pytest.raises(EnvironmentProblem, match=r"smollm2-135m is not built in the runner cache .*cache.* "
                                                 r"python -m runner.workloads.model.smollm2"):
        DockerBackend().check(plan_for(job, "docker"))
    built = tmp_path / "cache" / "smollm2-135m" / "0123456789abcdef"
    built.mkdir(parents=True)
    (built / "build.json").write_text("{}")
    with pytest.raises(EnvironmentProblem, match="no Docker engine answers"):  # past the base, on to the engine
        DockerBackend().check(plan_for(job, "docker"))
    tiny = load_job(JOB_72B, ["model.base=tiny", "image=cpu", "resources.gpus=0"])
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "empty"))
    with pytest.raises(EnvironmentProblem, match="no Docker engine answers"):  # the container builds tiny itself
        DockerBackend().check(plan_for(tiny, "docker"))


def test_a_service_shares_the_host_network_so_its_address_means_the_same() -> None:
    job = load_job(str(ROOT / "jobs" / "serve.yaml"), ["image=cpu", "backend=docker", "server.port=8123"])
    spec = container_spec(plan_for(job, "docker"), "/r", "id")
    assert spec.network == "host" and spec.ports == []  # loopback stays loopback; nothing to publish
    args = spec.docker_args()
    assert "--network" in args and args[args.index("--network") + 1] == "host" and "-p" not in args
    assert spec.sdk_kwargs()["network_mode"] == "host" and "ports" not in spec.sdk_kwargs()


def test_no_engine_is_one_plain_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(EnvironmentProblem, match=r"no Docker engine answers at unix:///nonexistent/docker.sock.*"
                                                 r"start dockerd .* or use --backend local"):
        client(timeout=2)


@pytest.mark.skipif(Path("/dev/kfd").exists(), reason="this machine has an AMD GPU")
def test_rocm_job_without_kfd_exits_3_fast_naming_the_device() -> None:
    t0 = time.monotonic()
    p = run_cli("run", JOB_72B)
    assert p.returncode == 3, p.stdout + p.stderr
    assert time.monotonic() - t0 < 10
    assert "/dev/kfd" in p.stderr and "Traceback" not in p.stderr


# --- a real engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> object:
    try:
        return client(timeout=10)
    except EnvironmentProblem as first:
        up = ROOT / ".ci" / "docker-up.sh"
        if os.geteuid() == 0 and up.exists():
            subprocess.run([str(up)], capture_output=True, timeout=300)
            try:
                return client(timeout=10)
            except EnvironmentProblem as e:
                pytest.skip(f"no Docker engine can be started here: {e}")
        pytest.skip(f"no Docker engine can be started here: {first}")


@pytest.fixture(scope="module")
def cpu_image(engine: object) -> str:
    from runner import images

    if not images.image_exists(engine, "qa-runner-base:bookworm-2") or not images.wheel_files():
        subprocess.run([str(ROOT / "images" / "local-base.sh")], check=True, timeout=900)
    ref = images.render_image("cpu")
    images.ensure_image(ref, engine, log=lambda line: None)
    return ref.tag


def _job_file(tmp_path: Path, name: str, body: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"kind: prepare\nname: {name}\nbackend: docker\nimage: cpu\n{body}")
    return f


def _containers(engine: object, run_id: str) -> list[object]:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run_id}"})  # type: ignore[attr-defined]


@pytest.mark.docker
def test_job_runs_in_a_container_as_the_host_user(engine: object, cpu_image: str, tmp_path: Path,
                                                   runner_home: Path) -> None:
    f = _job_file(tmp_path, "prep-docker", "data:\n  train: builtin:categories?per_topic=20\n  val_fraction: 0.2\n")
    p = run_cli("run", str(f), timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = next((runner_home / "runs" / "prep-docker").iterdir())
    assert "prepared" in (run_dir / "run.log").read_text()
    assert "prepared" in p.stdout  # streamed to the terminal too
    out = run_dir / "train.jsonl"
    assert out.stat().st_size > 0 and out.stat().st_uid == os.getuid()
    st = __import__("json").loads((run_dir / "status.json").read_text())
    assert st["state"] == "succeeded" and st["backend_ref"]["image"] == cpu_image
    assert _containers(engine, run_dir.name) == []  # removed once its exit was recorded
    script = (run_dir / "plan" / "docker-run.sh").read_text()
    assert "--network none" in script and "on this host" in script


@pytest.mark.docker
def test_a_failing_job_propagates_its_exit_code(engine: object, cpu_image: str, tmp_path: Path) -> None:
    # `remote: true`: validation leaves the path to the container, where it is missing and the job fails.
    f = _job_file(tmp_path, "prep-fails", "data:\n  train: [{path: /nonexistent/data.jsonl, remote: true}]\n")
    p = run_cli("run", str(f), timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "failed (exit 1)" in p.stderr


@pytest.mark.docker
def test_files_belong_to_the_user_the_container_runs_as(engine: object, cpu_image: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.runs import RunStore

    job = load_job(str(_job_file(tmp_path, "prep-uid", "data:\n  train: builtin:categories?per_topic=5\n")))
    plan = plan_for(job, "docker")
    run = RunStore().create(job, plan)
    for d in (run.dir, *run.dir.rglob("*")):
        os.chown(d, 4321, 4321)
    monkeypatch.setenv("RUNNER_DOCKER_USER", "4321:4321")
    handle = DockerBackend().start(plan, run, attach=False)
    assert handle.wait() == 0
    assert (run.dir / "train.jsonl").stat().st_uid == 4321


def _sleeper_plan(job_file: Path) -> object:
    """The job's plan with an entrypoint that waits for SIGTERM and exits as a cancelled trainer would."""
    job = load_job(str(job_file))
    plan = plan_for(job, "docker")
    code = ("import signal, sys, time, pathlib\n"
            "def stop(*a):\n"
            "    pathlib.Path('/workspace/run/checkpoints/step-00000001').mkdir(parents=True)\n"
            "    print('checkpoint written', flush=True); sys.exit(130)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('training', flush=True)\n"
            "time.sleep(600)\n")
    entry = f"#!/usr/bin/env bash\nexec python3 -c {__import__('shlex').quote(code)}\n"
    return replace(plan, files={**plan.files, "entrypoint.sh": entry})


def _wait_log(path: Path, text: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.docker
def test_cancel_from_another_process_stops_the_container_gracefully(engine: object, cpu_image: str,
                                                                    tmp_path: Path) -> None:
    from runner.runs import RunStore

    plan = _sleeper_plan(_job_file(tmp_path, "prep-cancel", "data:\n  train: builtin:categories\n"))
    run = RunStore().create(plan.job, plan)  # type: ignore[attr-defined]
    codes: list[int] = []
    with run.lock():
        run.set_state("running", runner_pid=os.getpid(), backend="docker")
        handle = DockerBackend().start(plan, run, attach=False)  # type: ignore[arg-type]
        waiter = threading.Thread(target=lambda: codes.append(handle.wait()))
        waiter.start()
        _wait_log(run.log_path, "training")
        # `runner cancel` from another terminal: SIGTERM through the engine, the job checkpoints and exits.
        p = subprocess.Popen([sys.executable, "-m", "runner", "cancel", run.id, "--grace", "20"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        waiter.join(timeout=60)
        assert codes == [EXIT_CANCELLED]
        run.set_state("cancelled", exit_code=codes[0])
    p.wait(timeout=60)
    assert (run.checkpoints_dir / "step-00000001").is_dir()
    assert "checkpoint written" in run.log_path.read_text()
    assert run.state == "cancelled"


@pytest.mark.docker
def test_an_orphaned_container_is_found_and_reported(engine: object, cpu_image: str, tmp_path: Path) -> None:
    from runner.runs import RunStore

    plan = _sleeper_plan(_job_file(tmp_path, "prep-orphan", "data:\n  train: builtin:categories\n"))
    run = RunStore().create(plan.job, plan)  # type: ignore[attr-defined]
    # A runner that started the container and then died: state running, nobody holds the run's lock.
    run.set_state("running", runner_pid=999999, backend="docker")
    handle = DockerBackend().start(plan, run, attach=False)  # type: ignore[arg-type]
    try:
        time.sleep(1.0)
        orphans = find_orphans()
        assert any(o["run_id"] == run.id and "no runner process drives it" in o["why"] for o in orphans)
        p = run_cli("ls", env={"COLUMNS": "200"})
        assert "running (orphaned)" in p.stdout, p.stdout
        assert run.status().get("orphan") is True
        assert DockerBackend().poll(run) == ("running", None)
    finally:
        DockerBackend().cancel(run, grace_s=5)
        handle.wait()
    shutil.rmtree(run.dir, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.slow
def test_quickstart_trains_in_a_container_and_cancel_keeps_a_checkpoint(engine: object, cpu_image: str,
                                                                        runner_home: Path) -> None:
    import json

    p = run_cli("run", "jobs/quickstart.yaml", "--backend", "docker", timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_dir = sorted((runner_home / "runs").glob("*/*"))[-1]
    cks = sorted((run_dir / "checkpoints").glob("step-*"))
    assert cks and all(c.stat().st_uid == os.getuid() for c in cks)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"

    # The same job, longer, cancelled from another process once its first checkpoint exists.
    p = run_cli("run", "jobs/quickstart.yaml", "--backend", "docker", "--fresh", "--detach",
                "--set", "train.steps=100000", "--set", "train.save_every=5", timeout=120)
    assert p.returncode == 0, p.stderr
    run_dir = sorted((runner_home / "runs").glob("*/*"), key=lambda d: d.name)[-1]
    end = time.monotonic() + 900
    while time.monotonic() < end and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(1)
    assert list((run_dir / "checkpoints").glob("step-*")), (run_dir / "run.log").read_text()[-3000:]
    p = run_cli("cancel", run_dir.name, "--grace", "60", timeout=180)
    assert p.returncode == 0 and "cancelled" in p.stdout, p.stdout + p.stderr
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert any(last.iterdir()), "the last checkpoint is complete"


@pytest.mark.docker
@pytest.mark.slow
def test_a_service_in_a_container_answers_on_the_port_serve_json_names(engine: object, cpu_image: str,
                                                                        runner_home: Path, tmp_path: Path) -> None:
    import json

    import httpx

    f = tmp_path / "serve-docker.yaml"
    f.write_text("kind: serve\nname: serve-docker\nbackend: docker\nimage: cpu\nmodel: {base: tiny}\n"
                 "server: {port: 0, max_seconds: 600}\n")
    p = run_cli("run", str(f), "--detach", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = next((runner_home / "runs" / "serve-docker").iterdir())
    try:
        end = time.monotonic() + 600
        while time.monotonic() < end and not (run_dir / "serve.json").exists():
            assert json.loads((run_dir / "status.json").read_text())["state"] in ("pending", "running"), \
                (run_dir / "run.log").read_text()[-3000:]
            time.sleep(1)
        url = json.loads((run_dir / "serve.json").read_text())["url"]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        r = httpx.post(f"{url}/v1/answer", json={"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"]}, timeout=60)
        assert r.status_code == 200 and r.json()["answer"] in "ABCD", r.text
    finally:
        p = run_cli("cancel", run_dir.name, "--grace", "30", timeout=120)
    assert p.returncode == 0 and "cancelled" in p.stdout, p.stdout + p.stderr
    assert _containers(engine, run_dir.name) == []


@pytest.mark.docker
@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not MMLU.is_dir(), reason=f"{MMLU} not present")
def test_a_smollm2_eval_runs_in_a_container_with_no_network(engine: object, cpu_image: str, runner_home: Path,
                                                             tmp_path: Path) -> None:
    import json

    from runner.workloads.model.smollm2 import ensure_smollm2

    ensure_smollm2(Path(os.environ["RUNNER_CACHE"]))  # the host builds it; the container finds it in the cache
    f = tmp_path / "eval-smollm2-docker.yaml"
    f.write_text("kind: eval\nname: eval-smollm2-docker\nbackend: docker\nimage: cpu\nmodel:\n  base: smollm2-135m\n"
                 f"data:\n  - path: {MMLU / 'val'}\n    format: mmlu_csv\nlimit: 10\ndevice: cpu\nthreads: 2\n")
    p = run_cli("run", str(f), timeout=600)
    run_dir = next((runner_home / "runs" / "eval-smollm2-docker").iterdir())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "--network none" in (run_dir / "plan" / "docker-run.sh").read_text()
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["n"] == 10 and ev["target"]["base"] == "smollm2-135m" and 0.0 <= ev["accuracy"] <= 1.0
    assert "building smollm2-135m" not in (run_dir / "run.log").read_text()  # loaded, not rebuilt
