"""JobSpec -> Plan: the image, command, environment, mounts and rendered files a backend needs to run a job.

Pure: nothing here writes, starts or probes anything (it reads templates and image definitions), which is what
makes `runner plan` and the tests cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.spec.models import Resources

if TYPE_CHECKING:
    from runner.images import ImageRef
    from runner.spec import Job
from runner.engine_commands import engine_image, engine_plan
from runner.templating import render_template

CONTAINER_RUN_DIR = "/workspace/run"
CONTAINER_CACHE_DIR = "/workspace/cache"
REDACTED = "***"

# Decoder layer class per architecture, for FSDP's auto-wrap policy.
LAYER_CLASSES = {"qwen3_moe": "Qwen3MoeDecoderLayer", "qwen3": "Qwen3DecoderLayer", "llama": "LlamaDecoderLayer",
                 "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Plan:
    job: Job
    kind: str
    name: str
    backend: str
    image: ImageRef | None
    argv: list[str]
    env: dict[str, str]
    secret_env: frozenset[str]
    mounts: list[Mount]
    files: dict[str, str]
    resources: Resources
    ports: list[int] = field(default_factory=list)
    workdir: str = "."

    @property
    def launcher(self) -> str:
        return "accelerate" if self.argv and self.argv[0] == "accelerate" else "python"

    def shown_env(self) -> dict[str, str]:
        """The environment as `runner plan` prints it: secrets redacted."""
        return {k: (REDACTED if k in self.secret_env else v) for k, v in sorted(self.env.items())}


def _layer_class(base: str) -> str:
    b = base.lower()
    for key, cls in LAYER_CLASSES.items():
        if key.replace("_", "") in b.replace("-", "").replace("_", "").replace(".", ""):
            return cls
    return "Qwen2DecoderLayer"


def image_flavour(image: str) -> str:
    """The hardware of an image name: `rocm`, `rocm-vllm` -> rocm; unknown names -> cpu."""
    head = image.split("-", 1)[0]
    return head if head in ("rocm", "cuda", "cpu") else "cpu"


def _accelerate_config(job: Job, flavour: str) -> str | None:
    spec: Any = job.spec
    if job.kind != "train":
        return None
    res = spec.resources
    world = res.world_size()
    if world == 1:
        distributed = "NO"
    elif res.gpus > 0 and res.strategy in ("fsdp", "auto"):
        distributed = "FSDP"
    else:
        # Also for CPU ranks: accelerate launches MULTI_CPU as a single process. With strategy fsdp on CPU the
        # trainer shards the decoder layers itself (FSDP2), since accelerate's FSDP takes only GPU ranks.
        distributed = "MULTI_GPU"
    mixed = "no" if res.gpus == 0 or spec.model.dtype in ("fp32",) else ("fp16" if spec.model.dtype == "fp16" else "bf16")
    return render_template(
        "accelerate.yaml.j2", name=job.name, nodes=res.nodes, gpus=res.gpus, flavour=flavour,
        distributed_type=distributed, mixed_precision=mixed, layer_cls=_layer_class(spec.model.base),
        gradient_checkpointing=spec.model.gradient_checkpointing, processes=res.processes, world=world,
    )


def _data_paths(spec: Any) -> list[str]:
    """Host paths of the job's data files (for container mounts); builtin data sets need none."""
    paths: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            p = node.get("path")
            if isinstance(p, str) and not p.startswith("builtin:") and "format" in node:
                paths.append(p)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec.model_dump(mode="json"))
    return paths


def render_plan(job: Job, backend: str | None = None, workdir: str | None = None) -> Plan:
    """What runs for `job` on `backend` (default: the job's own): image, argv, env, mounts and the rendered files
    every backend shares. The backend's own files (sbatch script, manifests) come from `runner.backends.plan_for`."""
    spec: Any = job.spec
    backend_name = backend or spec.backend
    flavour = image_flavour(spec.image)
    wd = str(Path(workdir or os.getcwd()).resolve())
    containerised = backend_name in ("docker", "kubernetes")

    accel = _accelerate_config(job, flavour)
    res = spec.resources
    multi = res.world_size() > 1
    if accel is not None and (multi or res.gpus >= 1):
        # Relative to the run directory; the entrypoint and backends pass it absolute. --quiet: a rank that fails
        # leaves the launcher's summary of which rank ended how, not its own traceback on top of the rank's error.
        argv = ["accelerate", "launch", "--quiet", "--config_file", "${RUNNER_RUN_DIR}/plan/accelerate.yaml",
                "-m", "runner.workloads"]
    else:
        argv = ["python", "-m", "runner.workloads"]
    if res.nodes > 1:
        from runner.launch import multinode_argv

        argv = multinode_argv(argv)

    env: dict[str, str] = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RUNNER_JOB": job.name,
        "RUNNER_SPEC_HASH": job.spec_hash,
        "RUNNER_WORKDIR": wd,
    }
    if containerised:
        env["RUNNER_RUN_DIR"] = CONTAINER_RUN_DIR
        env["RUNNER_CACHE"] = CONTAINER_CACHE_DIR
        env["HF_HOME"] = f"{CONTAINER_CACHE_DIR}/hf"
    if flavour == "rocm":
        env["PYTORCH_HIP_ALLOC_CONF"] = "expandable_segments:True"
        env["HSA_FORCE_FINE_GRAIN_PCIE"] = "1"
    elif flavour == "cuda":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env.update(spec.env)
    secret_names = {k for k in spec.env if f"env.{k}" in job.secret_paths}
    # Values a job file takes from `${env:NAME}` travel as the variable NAME itself (redacted when shown), so the
    # workload resolves them inside the container and they are never written into the run directory.
    from runner.spec.loader import ENV_RE

    for template in job.templates.values():
        for m in ENV_RE.finditer(template):
            if m.group(1) in os.environ:
                env.setdefault(m.group(1), os.environ[m.group(1)])
                secret_names.add(m.group(1))
    secrets = frozenset(secret_names)

    mounts: list[Mount] = []
    if backend_name in ("docker",):
        # Same-path mounts: the project and the data files appear inside at the paths the job file names.
        mounts.append(Mount(wd, wd, True))
        for p in _data_paths(spec):
            hp = str((Path(wd) / p).resolve())
            if not hp.startswith(wd + os.sep):
                mounts.append(Mount(hp, hp, True))
        if job.kind != "train":
            # eval / serve / tournament jobs read other runs' checkpoints and the registry: same path, read-only.
            from runner.paths import runner_home

            home = str(runner_home())
            env["RUNNER_HOME"] = home
            mounts.append(Mount(home, home, True))
        for m in spec.mounts:
            mounts.append(Mount(str((Path(wd) / m.source).resolve()) if not m.source.startswith("/") else m.source,
                                m.target, m.read_only))

    image: ImageRef | None = None
    if backend_name in ("docker", "kubernetes") or (backend_name == "slurm" and spec.image != "cpu"):
        from runner.images import render_image

        image = render_image(engine_image(spec))

    files: dict[str, str] = {}
    if accel is not None:
        files["accelerate.yaml"] = accel
    engine = engine_plan(spec, backend_name, image)
    if engine is not None:
        files["engine.sh"] = engine
    files["entrypoint.sh"] = render_template(
        "entrypoint.sh.j2", name=job.name, kind=job.kind, backend=backend_name, containerised=containerised,
        argv=argv,
    )
    return Plan(
        job=job, kind=job.kind, name=job.name, backend=backend_name, image=image, argv=argv, env=env,
        secret_env=secrets, mounts=mounts, files=files, resources=res, ports=list(_ports(spec)), workdir=wd,
    )


def _ports(spec: Any) -> list[int]:
    port = getattr(spec, "port", None) or getattr(getattr(spec, "server", None), "port", None)
    return [int(port)] if isinstance(port, int) else []
