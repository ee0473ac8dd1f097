"""Docker backend: the plan in a container of its image, built when missing, with the GPU devices of its flavour.

One `ContainerSpec` is computed per run and turned both into the Docker SDK call and into plan/docker-run.sh,
so what `runner plan` shows is exactly what runs. The SDK (`docker`) is imported inside functions only.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runner.backends.base import EXIT_CANCELLED, EnvironmentProblem, OutputPump
from runner.spec.models import HOST_BUILT_BASES, OFFLINE_BASE_MARKERS

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run
from runner.backends.devices import amd_device_flags, device_gids, kfd_render_minors

GRACE_S = 30.0
LABEL_RUN = "qa-runner.run-id"
LABEL_JOB = "qa-runner.job"
LABEL_DIR = "qa-runner.run-dir"
LABEL_SPEC = "qa-runner.spec-hash"
CONTAINER_RUN_DIR = "/workspace/run"
CONTAINER_CACHE_DIR = "/workspace/cache"


# --- the container -------------------------------------------------------------------------------------


@dataclass
class ContainerSpec:
    image: str
    name: str
    command: list[str]
    env: dict[str, str]
    secret_env: frozenset[str]
    labels: dict[str, str]
    binds: list[tuple[str, str, bool]]  # (host, container, read_only)
    user: str
    workdir: str
    shm_size: str
    network: str | None  # None: the engine's default network
    devices: list[str] = field(default_factory=list)
    group_add: list[str] = field(default_factory=list)
    ipc_mode: str | None = None
    cap_add: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    gpu_request: int | None = None  # NVIDIA: number of GPUs (-1 = all)
    ports: list[int] = field(default_factory=list)

    def sdk_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for docker-py's `containers.run` (detached)."""
        kw: dict[str, Any] = {
            "image": self.image, "command": self.command, "name": self.name, "environment": dict(self.env),
            "labels": dict(self.labels), "user": self.user, "working_dir": self.workdir, "shm_size": self.shm_size,
            "volumes": {h: {"bind": c, "mode": "ro" if ro else "rw"} for h, c, ro in self.binds},
            "init": True, "detach": True, "stdin_open": False, "tty": False,
        }
        if self.network:
            kw["network_mode"] = self.network
        if self.devices:
            kw["devices"] = [f"{d}:{d}:rwm" for d in self.devices]
        if self.group_add:
            kw["group_add"] = list(self.group_add)
        if self.ipc_mode:
            kw["ipc_mode"] = self.ipc_mode
        if self.cap_add:
            kw["cap_add"] = list(self.cap_add)
        if self.security_opt:
            kw["security_opt"] = list(self.security_opt)
        if self.gpu_request is not None:
            import docker.types

            kw["device_requests"] = [docker.types.DeviceRequest(count=self.gpu_request, capabilities=[["gpu"]])]
        if self.ports:
            kw["ports"] = {f"{p}/tcp": p for p in self.ports}
        return kw

    def docker_args(self, redact: bool = True) -> list[str]:
        """The same container as `docker run` arguments (secret values passed through from the environment)."""
        a = ["docker", "run", "--name", self.name, "--init"]
        for k, v in sorted(self.labels.items()):
            a += ["--label", f"{k}={v}"]
        a += ["--user", self.user, "--workdir", self.workdir, "--shm-size", self.shm_size]
        if self.network:
            a += ["--network", self.network]
        if self.ipc_mode:
            a += [f"--ipc={self.ipc_mode}"]
        for d in self.devices:
            a += ["--device", d]
        for g in self.group_add:
            a += ["--group-add", g]
        for c in self.cap_add:
            a += ["--cap-add", c]
        for s in self.security_opt:
            a += ["--security-opt", s]
        if self.gpu_request is not None:
            a += ["--gpus", "all" if self.gpu_request < 0 else str(self.gpu_request)]
        for p in self.ports:
            a += ["-p", f"{p}:{p}"]
        for h, c, ro in self.binds:
            a += ["-v", f"{h}:{c}:{'ro' if ro else 'rw'}"]
        for k, v in sorted(self.env.items()):
            a += ["-e", k if (redact and k in self.secret_env) else f"{k}={v}"]
        return a + [self.image, *self.command]


def host_cache_dir() -> Path:
    from runner.paths import runner_home

    return Path(os.environ.get("RUNNER_CACHE") or runner_home() / "cache").resolve()


def container_name(job: str, run_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"qa-runner-{job}-{run_id}")[:120]


def model_bases(spec: Any) -> list[str]:
    """The `model.base` values a job names: its model's, or each eval ensemble member's."""
    models = [getattr(spec, "model", None)] + [getattr(m, "model", None) for m in getattr(spec, "models", None) or []]
    return [str(m.base) for m in models if m is not None]


def base_is_local(base: str, workdir: str) -> bool:
    """A named offline base (built into the mounted cache) or a directory: nothing to download."""
    return base in OFFLINE_BASE_MARKERS or base.startswith(("/", ".", "~")) or (Path(workdir) / base).exists()


def offline_base_built(base: str, cache: Path) -> bool:
    return any((cache / base).glob(f"*/{OFFLINE_BASE_MARKERS[base]}"))


def wants_network(plan: Plan) -> bool:
    """Training and data jobs run with no network unless they must fetch a model from the Hub or serve a port."""
    if plan.ports:
        return True
    if plan.kind not in ("train", "prepare", "eval"):
        return True
    if plan.env.get("HF_HUB_OFFLINE") == "1":
        return False
    return not all(base_is_local(b, plan.workdir) for b in model_bases(plan.job.spec))


def network_mode(plan: Plan) -> str | None:
    """`host` for a service: its `server.host`/`server.port` then mean what they mean for a local process (loopback
    stays loopback, port 0 picks a free host port that serve.json reports); `none` when nothing needs the network;
    None (the engine's default network) otherwise."""
    if plan.kind == "serve":
        return "host"
    return None if wants_network(plan) else "none"


def container_spec(plan: Plan, run_dir: str, run_id: str, *, uid: int | None = None, gid: int | None = None,
                   render_minors: list[int] | None = None, cache_dir: str | None = None,
                   extra_gids: list[str] | None = None) -> ContainerSpec:
    """Everything about the run's container; pure given its arguments."""
    if plan.image is None:
        raise EnvironmentProblem(f"job {plan.name!r} has no image; the docker backend needs `image:` (cpu, rocm, cuda)")
    res = plan.resources
    env = dict(plan.env)
    env.update({"RUNNER_RUN_DIR": CONTAINER_RUN_DIR, "RUNNER_CACHE": CONTAINER_CACHE_DIR, "HOME": "/tmp"})
    env.setdefault("HF_HOME", f"{CONTAINER_CACHE_DIR}/hf")
    binds = [(run_dir, CONTAINER_RUN_DIR, False), (cache_dir or str(host_cache_dir()), CONTAINER_CACHE_DIR, False)]
    binds += [(m.source, m.target, m.read_only) for m in plan.mounts]
    spec = ContainerSpec(
        image=plan.image.tag,
        name=container_name(plan.name, run_id),
        command=["bash", f"{CONTAINER_RUN_DIR}/plan/entrypoint.sh"],
        env=env,
        secret_env=plan.secret_env,
        labels={LABEL_RUN: run_id, LABEL_JOB: plan.name, LABEL_DIR: run_dir, LABEL_SPEC: plan.job.spec_hash},
        binds=binds,
        user=f"{os.getuid() if uid is None else uid}:{os.getgid() if gid is None else gid}",
        workdir=plan.workdir,
        shm_size=f"{res.container.shm_gb}g",
        network=network_mode(plan),
        ports=[] if network_mode(plan) == "host" else list(plan.ports),  # the host's own ports: nothing to publish
    )
    if plan.image.flavour == "rocm":
        flags = amd_device_flags(res.gpus, render_minors)
        spec.devices = flags["devices"]
        spec.group_add = flags["group_add"] + [g for g in (extra_gids or []) if g not in flags["group_add"]]
        spec.ipc_mode = flags["ipc_mode"]
        spec.cap_add = flags["cap_add"]
        spec.security_opt = flags["security_opt"]
    elif plan.image.flavour == "cuda":
        spec.gpu_request = res.gpus if res.gpus > 0 else -1
        spec.ipc_mode = "host"
    return spec


def _shell_word(arg: str, subst: dict[str, str]) -> str:
    """Quote one argument; the values in `subst` become the shell variables they stand for."""
    for value, var in subst.items():
        if value and value in arg:
            parts = arg.split(value)
            return f'"{var}"'.join(shlex.quote(p) if p else "" for p in parts)
    return shlex.quote(arg)


def render_run_script(spec: ContainerSpec, plan: Plan, resolved: bool = False) -> str:
    """plan/docker-run.sh: the `docker run` equivalent, every value shell-quoted, runnable by hand."""
    run_dir, run_id = spec.labels[LABEL_DIR], spec.labels[LABEL_RUN]
    subst = {run_dir: "$run_dir", run_id: "$run_id"}
    args = spec.docker_args()[2:]
    lines: list[str] = []
    i = 0
    while i < len(args):  # one `--flag value` pair per line
        a = args[i]
        if a.startswith("-") and "=" not in a and a != "--init" and i + 1 < len(args):
            lines.append(f"{a} {_shell_word(args[i + 1], subst)}")
            i += 2
        elif a == spec.image:
            lines.append(" ".join(_shell_word(x, subst) for x in args[i:]))
            break
        else:
            lines.append(_shell_word(a, subst))
            i += 1
    assert plan.image is not None
    head = [
        "#!/usr/bin/env bash",
        f"# The container of job {plan.name!r} exactly as the docker backend starts it"
        + (" on this host." if resolved else "."),
        f"# Image {spec.image} is built from plan/Dockerfile: python -m runner.images build {plan.image.name}",
        "# The run directory is the parent of this plan/ folder; the container runs as the host user.",
    ]
    if spec.devices and not resolved:
        head.append("# GPU render nodes come from the host's KFD topology at start (renderD128 up is the usual order).")
    secrets = sorted(spec.secret_env & set(spec.env))
    if secrets:
        head.append(f"# Secrets are passed through from your environment: {', '.join(secrets)}.")
    head += [
        "set -euo pipefail",
        'run_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"',
        'run_id="$(basename "$run_dir")"',
        'user="${RUNNER_DOCKER_USER:-$(id -u):$(id -g)}"',
    ]
    user_line = f"--user {shlex.quote(spec.user)}"
    lines = ['--user "$user"' if ln == user_line else ln for ln in lines]
    return "\n".join(head) + "\n\nexec docker run \\\n  " + " \\\n  ".join(lines) + "\n"


# --- engine --------------------------------------------------------------------------------------------


def engine_url() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def client(timeout: int = 10) -> Any:
    """A connected docker-py client, or EnvironmentProblem saying plainly that no engine answers."""
    try:
        import docker
    except ImportError:
        raise EnvironmentProblem("the Docker SDK is not installed (pip install docker); or use --backend local") from None
    try:
        c = docker.from_env(timeout=timeout)
        c.ping()
        return c
    except docker.errors.DockerException as e:
        why = str(e).split("(")[0].strip() or type(e).__name__
        raise EnvironmentProblem(
            f"no Docker engine answers at {engine_url()} ({why}); start dockerd (e.g. .ci/docker-up.sh) "
            f"or use --backend local"
        ) from None


class DockerHandle:
    def __init__(self, container: Any, run: Run, attach: bool, log: IO[bytes], grace_s: float = GRACE_S):
        self.container = container
        self.run = run
        self.attach = attach
        self.grace_s = grace_s
        self._pump = OutputPump(
            lambda: container.logs(stream=True, follow=True, stdout=True, stderr=True), log, attach, "container"
        )

    def wait(self) -> int:
        import docker.errors

        try:
            result = self.container.wait()
            code = int(result.get("StatusCode", 1))
        except docker.errors.NotFound:
            code = EXIT_CANCELLED if self.run.status().get("cancel_requested") else 1
        self._pump.close(timeout=30)
        try:
            self.container.remove(force=True)
        except docker.errors.APIError:
            pass
        # docker-init reports a child killed by signal N as 128+N; SIGTERM/SIGINT both mean cancelled.
        if code in (128 + 15, 128 + 2):
            code = EXIT_CANCELLED
        return code

    def cancel(self) -> None:
        # Called from a signal handler: send SIGTERM now, kill after the grace period from a thread.
        stop_container(self.container, self.grace_s, block=False)


def stop_container(container: Any, grace_s: float, block: bool) -> None:
    import docker.errors

    try:
        container.kill(signal="SIGTERM")
    except docker.errors.APIError:
        return

    def reaper() -> None:
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            try:
                container.reload()
                if container.status not in ("running", "restarting", "created"):
                    return
            except docker.errors.APIError:
                return
            time.sleep(0.5)
        try:
            container.kill(signal="SIGKILL")
        except docker.errors.APIError:
            pass

    if block:
        reaper()
    else:
        threading.Thread(target=reaper, daemon=True).start()


class DockerBackend:
    name = "docker"

    def render_files(self, plan: Plan) -> dict[str, str]:
        if plan.image is None:
            return {}
        spec = container_spec(plan, "/RUNDIR", "RUNID")
        return {"Dockerfile": plan.image.dockerfile, "docker-run.sh": render_run_script(spec, plan)}

    def check(self, plan: Plan) -> None:
        if plan.image is None:
            raise EnvironmentProblem(f"job {plan.name!r} has no image for the docker backend")
        cache = host_cache_dir()
        for base in model_bases(plan.job.spec):
            if base in HOST_BUILT_BASES and not offline_base_built(base, cache):
                raise EnvironmentProblem(
                    f"model.base {base} is not built in the runner cache {cache}, and a container cannot build it "
                    f"(it runs without network and the image has no converter); build it once on this machine "
                    f"with {HOST_BUILT_BASES[base]}, then run the job again"
                )
        flavour = plan.image.flavour
        if flavour == "rocm":
            if not Path("/dev/kfd").exists():
                raise EnvironmentProblem(
                    f"image {plan.image.name!r} needs an AMD GPU, but /dev/kfd (the ROCm compute device) does not "
                    f"exist on this machine: no amdgpu kernel driver here; run it on a ROCm host, or try it on CPU "
                    f"with --set image=cpu --set resources.gpus=0"
                )
            if not Path("/dev/dri").exists():
                raise EnvironmentProblem("image 'rocm' needs /dev/dri (the GPU render nodes), which does not exist here")
            minors = kfd_render_minors()
            if plan.resources.gpus > len(minors) > 0:
                raise EnvironmentProblem(
                    f"the job asks for resources.gpus={plan.resources.gpus} but this host has {len(minors)} AMD GPU(s)"
                )
        elif flavour == "cuda" and plan.resources.gpus > 0 and not Path("/dev/nvidiactl").exists():
            raise EnvironmentProblem(
                f"image {plan.image.name!r} needs an NVIDIA GPU, but /dev/nvidiactl does not exist on this machine "
                f"(no NVIDIA driver); run it on a CUDA host or use --set image=cpu --set resources.gpus=0"
            )
        c = client()
        if flavour == "cuda" and plan.resources.gpus > 0:
            runtimes = (c.info().get("Runtimes") or {}).keys()
            if "nvidia" not in runtimes and not Path("/etc/cdi").exists():
                raise EnvironmentProblem(
                    "the Docker engine has no NVIDIA runtime (nvidia-container-toolkit); install it to pass GPUs in"
                )
        from runner import images

        if not images.image_exists(c, plan.image.tag):
            try:
                images._check_inputs(plan.image, c)
            except images.ImageError as e:
                raise EnvironmentProblem(str(e)) from None

    def start(self, plan: Plan, run: Run, attach: bool = True) -> DockerHandle:
        import docker.errors

        from runner import images
        from runner.files import atomic_write

        c = client()
        log = open(run.log_path, "ab")

        def say(line: str) -> None:
            log.write(line.encode())
            log.flush()
            if attach:
                print(line, end="", file=sys.stderr, flush=True)

        try:
            assert plan.image is not None
            images.ensure_image(plan.image, c, log=say)
        except images.ImageError as e:
            log.close()
            raise EnvironmentProblem(str(e)) from None
        cache = host_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        minors = kfd_render_minors() if plan.image.flavour == "rocm" else []
        spec = container_spec(plan, str(run.dir), run.id, render_minors=minors or None, cache_dir=str(cache))
        spec.group_add += [g for g in device_gids(spec.devices) if g not in spec.group_add]
        if os.environ.get("RUNNER_DOCKER_USER"):  # e.g. 1000:1000 when a root driver runs jobs for a user
            spec.user = os.environ["RUNNER_DOCKER_USER"]
        atomic_write(run.plan_dir / "docker-run.sh", render_run_script(spec, plan, resolved=True))
        try:
            old = c.containers.get(spec.name)
            if old.status == "running":
                log.close()
                raise EnvironmentProblem(f"container {spec.name} of this run is already running")
            old.remove(force=True)
        except docker.errors.NotFound:
            pass
        try:
            container = c.containers.run(**spec.sdk_kwargs())
        except docker.errors.APIError as e:
            log.close()
            raise EnvironmentProblem(f"docker could not start the container: {e.explanation or e}") from None
        run.update(backend_ref={"container_id": container.id, "container_name": spec.name, "image": spec.image,
                                "engine": engine_url(), "host": os.uname().nodename})
        return DockerHandle(container, run, attach, log)

    def _container(self, run: Run) -> Any | None:
        import docker.errors

        ref = run.status().get("backend_ref") or {}
        cid = ref.get("container_id") or ref.get("container_name")
        if not cid:
            return None
        try:
            return client(timeout=5).containers.get(cid)
        except (docker.errors.NotFound, EnvironmentProblem):
            return None

    def poll(self, run: Run) -> tuple[str, int | None] | None:
        cont = self._container(run)
        if cont is None:
            return None
        if cont.status in ("running", "restarting", "created", "paused"):
            return ("running", None)
        code = int((cont.attrs.get("State") or {}).get("ExitCode", 1))
        if code == 0:
            return ("succeeded", 0)
        if code in (EXIT_CANCELLED, 128 + 15, 128 + 2) or run.status().get("cancel_requested"):
            return ("cancelled", code)
        return ("failed", code)

    def cancel(self, run: Run, grace_s: float = GRACE_S) -> None:
        cont = self._container(run)
        if cont is not None:
            stop_container(cont, grace_s, block=True)


def labelled_containers(all_states: bool = True) -> list[dict[str, Any]]:
    """Containers started by this runner on the engine: id, name, status, run id, job and run directory."""
    c = client(timeout=5)
    out = []
    for cont in c.containers.list(all=all_states, filters={"label": LABEL_RUN}):
        lab = cont.labels
        out.append({"id": cont.id, "name": cont.name, "status": cont.status, "run_id": lab.get(LABEL_RUN),
                    "job": lab.get(LABEL_JOB), "run_dir": lab.get(LABEL_DIR)})
    return out


def find_orphans() -> list[dict[str, Any]]:
    """Running containers whose run has no live runner driving it (the runner crashed or was killed -9)."""
    from runner.runs import Run

    orphans = []
    for info in labelled_containers(all_states=False):
        d = Path(info.get("run_dir") or "")
        if not (d / "status.json").exists():
            info["why"] = "its run directory is gone"
            orphans.append(info)
            continue
        run = Run(d)
        if not run.is_locked():
            info["why"] = f"run {run.ref} is {run.state} but no runner process drives it"
            orphans.append(info)
    return orphans
