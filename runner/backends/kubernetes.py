"""Kubernetes backend: the plan as an Indexed Job (one pod per node) plus a headless Service for the rendezvous.

Rendering is pure and needs nothing installed. Applying, following and cancelling use the official `kubernetes`
client (the `cluster` extra), imported only when a run starts, with the kubeconfig of the machine.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from runner.backends.base import EXIT_CANCELLED, EnvironmentProblem, tee_output

if TYPE_CHECKING:
    from runner.plan import Plan
    from runner.runs import Run

RUN_MARK = "${RUN}"
PORT = 29500
GRACE_S = 300  # seconds a pod gets between SIGTERM and SIGKILL: time to write a checkpoint
DEFAULT_CLAIM = "qa-runner-runs"
RUN_DIR = "/workspace/run"
CACHE_DIR = "/workspace/cache"
PROJECT_DIR = "/workspace/project"
HOME_DIR = "/workspace/home"  # RUNNER_HOME of eval, serve and tournament pods: the volume's registry/ and runs/, read-only
POLL_S = 2.0
HOST_ONLY_ENV = ("RUNNER_RUN_DIR", "RUNNER_CACHE", "RUNNER_HOME", "RUNNER_WORKDIR", "HF_HOME")


def k8s_name(name: str) -> str:
    """A job name as a DNS-1035 label prefix (leaves room for `-<run id>-<index>` within 63 characters)."""
    n = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not n or not n[0].isalpha():
        n = "qa-" + n
    return n[:30].rstrip("-")


def run_suffix(run_id: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")


def object_name(plan_name: str, run_id: str) -> str:
    return f"{k8s_name(plan_name)}-{run_suffix(run_id)}"


def manifests_for_run(text: str, run_id: str) -> list[dict[str, Any]]:
    """The rendered kubernetes.yaml with the run id filled in, as API objects in apply order."""
    from ruamel.yaml import YAML

    docs = YAML(typ="safe").load_all(text.replace(RUN_MARK, run_suffix(run_id)))
    return [d for d in docs if d]


def yaml_block(text: str, indent: int) -> str:
    """`text` as a YAML literal block scalar under a key indented by `indent - 2`, exact to the byte."""
    body = text.rstrip("\n")
    if not body.strip():
        return json.dumps(text)
    trailing = len(text) - len(body)
    chomp = "-" if trailing == 0 else ("" if trailing == 1 else "+")
    indicator = "2" if body[0] in " \t" else ""
    lines = [(" " * indent + ln) if ln else "" for ln in body.split("\n")] + [""] * max(trailing - 1, 0)
    return f"|{indicator}{chomp}\n" + "\n".join(lines)


def _job_yaml(plan: Plan) -> str:
    from ruamel.yaml import YAML

    data = plan.job.data()
    data["spec_hash"] = plan.job.spec_hash
    # Secret values reach the pods through the run's Secret, never through a ConfigMap.
    data["env"] = {k: v for k, v in data.get("env", {}).items() if k not in plan.secret_env}
    yaml = YAML()
    yaml.default_flow_style = False
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def _client() -> Any:
    """The `kubernetes` module with the kubeconfig loaded (raises EnvironmentProblem)."""
    try:
        import kubernetes
    except ImportError:
        raise EnvironmentProblem(
            "the kubernetes backend needs the `kubernetes` Python client: pip install 'qa-runner[cluster]'"
        ) from None
    try:
        # KUBECONFIG as it is now (the client reads it once, at import).
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or "~/.kube/config")
    except Exception as e:  # no file, no context, bad file: the client raises several unrelated types
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            raise EnvironmentProblem(
                f"no Kubernetes cluster configured ({e}); point KUBECONFIG at a kubeconfig, or apply the "
                "manifests of `runner plan --backend kubernetes` by hand"
            ) from None
    return kubernetes


def _api_error(e: Exception, what: str) -> EnvironmentProblem:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None) or str(e).splitlines()[0]
    return EnvironmentProblem(f"Kubernetes refused to {what}: {status or ''} {reason}".replace("  ", " "))


class KubernetesHandle:
    def __init__(self, backend: KubernetesBackend, run: Run, attach: bool):
        self.backend = backend
        self.run = run
        self.attach = attach

    def _stream_rank0(self, k8s: Any, ns: str, pod: str) -> None:
        core = k8s.client.CoreV1Api()
        try:
            resp = core.read_namespaced_pod_log(
                pod, ns, container="workload", follow=True, _preload_content=False
            )
        except k8s.client.ApiException:
            return
        with open(self.run.log_path, "ab") as log:
            tee_output(resp.stream(65536), log, self.attach)

    def wait(self) -> int:
        k8s = _client()
        ref = self.run.status()["backend_ref"]
        streamer: threading.Thread | None = None
        while True:
            seen = self.backend.poll(self.run)
            if streamer is None:
                pod = rank0_pod(k8s, ref["namespace"], ref["job"])
                if pod is not None and pod.status.phase in ("Running", "Succeeded", "Failed"):
                    streamer = threading.Thread(
                        target=self._stream_rank0,
                        args=(k8s, ref["namespace"], pod.metadata.name),
                        daemon=True,
                    )
                    streamer.start()
            if seen is not None and seen[0] in ("succeeded", "failed", "cancelled"):
                if streamer is not None:
                    streamer.join(timeout=10)
                return int(seen[1] if seen[1] is not None else (0 if seen[0] == "succeeded" else 1))
            time.sleep(POLL_S)

    def cancel(self) -> None:
        threading.Thread(target=self.backend.cancel, args=(self.run,), daemon=True).start()


def rank0_pod(k8s: Any, ns: str, job: str) -> Any | None:
    pods = k8s.client.CoreV1Api().list_namespaced_pod(ns, label_selector=f"job-name={job}").items
    for p in pods:
        ann = p.metadata.annotations or {}
        if ann.get("batch.kubernetes.io/job-completion-index", "0") == "0":
            return p
    return None


def job_state(job: Any, rank0: Any | None) -> tuple[str, int | None]:
    """Job conditions (and rank 0's exit code) as a run state."""
    st = job.status
    conds = {c.type: c.status for c in (st.conditions or [])}
    code = None
    if rank0 is not None:
        for cs in rank0.status.container_statuses or []:
            if cs.state is not None and cs.state.terminated is not None:
                code = int(cs.state.terminated.exit_code)
    if conds.get("Complete") == "True":
        return ("succeeded", 0)
    if conds.get("Failed") == "True":
        if code == EXIT_CANCELLED:
            return ("cancelled", code)
        return ("failed", code or 1)
    if (st.active or 0) > 0 and rank0 is not None and rank0.status.phase == "Running":
        return ("running", None)
    return ("pending", None)


class KubernetesBackend:
    name = "kubernetes"

    def render_files(self, plan: Plan) -> dict[str, str]:
        from runner.templating import render_template

        res = plan.resources
        flavour = plan.image.flavour if plan.image is not None else "cpu"
        tag = plan.image.tag if plan.image is not None else "qa-runner-cpu:latest"
        image = f"{res.container.registry.rstrip('/')}/{tag}" if res.container.registry else tag
        files: dict[str, str] = {}
        config = {
            "job.yaml": _job_yaml(plan),
            **{
                k: v
                for k, v in {**plan.files, **files}.items()
                if "/" not in k and k not in ("Dockerfile", "docker-run.sh")
            },
        }
        return {
            **files,
            "kubernetes.yaml": render_template(
                "kubernetes.yaml.j2",
                name=plan.name,
                job_name=plan.name,
                kind=plan.kind,
                k8s_name=k8s_name(plan.name),
                nodes=res.nodes,
                gpus=res.gpus,
                cpus=res.cpus,
                memory_gb=res.memory_gb,
                shm_gb=res.container.shm_gb,
                gpu_resource="nvidia.com/gpu" if flavour == "cuda" else "amd.com/gpu",
                namespace=res.kubernetes.namespace,
                storage_class=res.kubernetes.storage_class,
                storage_gb=res.kubernetes.storage_gb,
                claim=res.kubernetes.volume_claim or DEFAULT_CLAIM,
                create_claim=res.kubernetes.volume_claim is None,
                image=image,
                env=[
                    (k, v)
                    for k, v in sorted(plan.env.items())
                    if k not in plan.secret_env and k not in HOST_ONLY_ENV
                ]
                + [("HF_HOME", f"{CACHE_DIR}/hf")],
                secret_keys=sorted(plan.secret_env),
                port=PORT,
                # a serve job's HTTP port: named container port, Service port, probes on /healthz, scrape /metrics
                http_port=plan.ports[0] if plan.kind == "serve" and plan.ports else None,
                config_files=[(k, yaml_block(v, 4)) for k, v in sorted(config.items())],
                grace_s=GRACE_S,
                run_dir=RUN_DIR,
                cache_dir=CACHE_DIR,
                project_dir=PROJECT_DIR,
                # eval/serve/tournament read registry versions and other runs' checkpoints from the volume
                reads_home=plan.kind not in ("train", "prepare"),
                home_dir=HOME_DIR,
            ),
        }

    def check(self, plan: Plan) -> None:
        k8s = _client()
        try:
            k8s.client.VersionApi().get_code(_request_timeout=5)
        except Exception as e:
            host = k8s.client.Configuration.get_default_copy().host
            why = getattr(e, "reason", None) or str(e).splitlines()[0]
            raise EnvironmentProblem(f"the Kubernetes API server at {host} does not answer ({why})") from None

    def start(self, plan: Plan, run: Run, attach: bool = True) -> KubernetesHandle:
        k8s = _client()
        objects = manifests_for_run((run.plan_dir / "kubernetes.yaml").read_text(), run.id)
        ns = plan.resources.kubernetes.namespace
        name = object_name(plan.name, run.id)
        core, batch = k8s.client.CoreV1Api(), k8s.client.BatchV1Api()
        # A resumed run reuses its names: clear what its last attempt left behind.
        _delete_run_objects(k8s, ns, name)
        if plan.secret_env:
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": name, "namespace": ns, "labels": {"qa-runner/run": run_suffix(run.id)}},
                "stringData": {k: plan.env.get(k, "") for k in sorted(plan.secret_env)},
            }
            objects.insert(0, secret)
        create = {
            "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
            "Secret": core.create_namespaced_secret,
            "Service": core.create_namespaced_service,
            "ConfigMap": core.create_namespaced_config_map,
            "Job": batch.create_namespaced_job,
        }
        for obj in objects:
            try:
                create[obj["kind"]](ns, obj, _preload_content=False)  # the reply is not needed
            except k8s.client.ApiException as e:
                if e.status == 409 and obj["kind"] == "PersistentVolumeClaim":
                    continue  # the shared volume already exists
                raise _api_error(e, f"create {obj['kind']} {obj['metadata']['name']}") from None
        run.update(backend_ref={"namespace": ns, "job": name})
        run.note("applied", namespace=ns, job=name, objects=[o["kind"] for o in objects])
        return KubernetesHandle(self, run, attach)

    def poll(self, run: Run) -> tuple[str, int | None] | None:
        ref = run.status().get("backend_ref") or {}
        if "job" not in ref:
            return None
        k8s = _client()
        try:
            job = k8s.client.BatchV1Api().read_namespaced_job(ref["job"], ref["namespace"])
        except k8s.client.ApiException as e:
            if e.status == 404:
                # Deleted: by `runner cancel` (cancelled) or by its TTL long after it ended (unknown).
                return ("cancelled", EXIT_CANCELLED) if run.status().get("cancel_requested") else None
            raise _api_error(e, f"read Job {ref['job']}") from None
        return job_state(job, rank0_pod(k8s, ref["namespace"], ref["job"]))

    def cancel(self, run: Run, grace_s: float = GRACE_S) -> None:
        ref = run.status().get("backend_ref") or {}
        if "job" in ref:
            # Deleting the Job SIGTERMs its pods; each has terminationGracePeriodSeconds to checkpoint.
            _delete_run_objects(_client(), ref["namespace"], ref["job"], int(grace_s))


def _delete_run_objects(k8s: Any, ns: str, name: str, grace_s: int | None = None) -> None:
    core, batch = k8s.client.CoreV1Api(), k8s.client.BatchV1Api()
    calls = [
        (batch.delete_namespaced_job, {"propagation_policy": "Foreground", "grace_period_seconds": grace_s}),
        (core.delete_namespaced_service, {}),
        (core.delete_namespaced_config_map, {}),
        (core.delete_namespaced_secret, {}),
    ]
    for call, kw in calls:
        try:
            call(name, ns, _preload_content=False, **{k: v for k, v in kw.items() if v is not None})
        except k8s.client.ApiException as e:
            if e.status != 404:
                raise _api_error(e, f"delete {name}") from None
