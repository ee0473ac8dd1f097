"""Kubernetes backend: the rendered manifests against the Kubernetes schemas (offline), and the apply/follow/cancel
code against a small fake API server speaking the real REST paths (no cluster can run here)."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from runner.backends import EnvironmentProblem, get_backend, plan_for
from runner.backends.kubernetes import k8s_name, manifests_for_run, object_name
from runner.runs import RunStore
from runner.spec import load_job
from tests.conftest import ROOT, run_cli

JOB_4NODE = ROOT / "jobs" / "train-72b-4node.yaml"
RUN_ID = "20261126-104500-ab12"


def _manifests(*sets: str) -> list[dict[str, Any]]:
    plan = plan_for(load_job(JOB_4NODE, list(sets), "kubernetes"), "kubernetes")
    return manifests_for_run(plan.files["kubernetes.yaml"], RUN_ID)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def test_plan_prints_manifests_that_pass_the_kubernetes_schemas() -> None:
    p = run_cli("plan", str(JOB_4NODE), "--backend", "kubernetes", check=True)
    text = p.stdout[p.stdout.index("# file: plan/kubernetes.yaml") + len("# file: plan/kubernetes.yaml\n") :]
    text = text.split("\n# file: ")[0]
    docs = manifests_for_run(text, RUN_ID)
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Service", "ConfigMap", "Job"]
    version = kubernetes_validate.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 30)
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)


def test_eval_pods_read_the_registry_and_runs_from_the_volume_read_only() -> None:
    def mounts_env(path: Path, *sets: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        plan = plan_for(load_job(path, ["backend=kubernetes", "image=cuda", *sets], "kubernetes"), "kubernetes")
        docs = manifests_for_run(plan.files["kubernetes.yaml"], RUN_ID)
        for d in docs:
            kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
        c = _by_kind(docs)["Job"]["spec"]["template"]["spec"]["containers"][0]
        return {m["mountPath"]: m for m in c["volumeMounts"]}, {e["name"]: e.get("value") for e in c["env"]}

    mounts, env = mounts_env(ROOT / "jobs" / "eval-checkpoint.yaml")
    home = env["RUNNER_HOME"]
    for sub in ("registry", "runs"):
        m = mounts[f"{home}/{sub}"]
        assert m["subPath"] == sub and m["readOnly"] is True
    mounts, env = mounts_env(JOB_4NODE)  # training writes only its own run directory
    assert "RUNNER_HOME" not in env and not any(p.endswith("/registry") for p in mounts)


def test_a_serve_pod_exposes_its_port_with_probes_and_metrics() -> None:
    sets = ["server.host=0.0.0.0", "server.port=8000"]
    plan = plan_for(load_job(ROOT / "jobs" / "serve.yaml", sets, "kubernetes"), "kubernetes")
    docs = manifests_for_run(plan.files["kubernetes.yaml"], RUN_ID)
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    k = _by_kind(docs)
    assert {"name": "http", "port": 8000, "targetPort": 8000} in k["Service"]["spec"]["ports"]
    pod = k["Job"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    c = pod["spec"]["containers"][0]
    assert {"name": "http", "containerPort": 8000} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1800  # time to load
    # Training pods get none of it.
    train = _by_kind(_manifests())["Job"]["spec"]["template"]
    assert "annotations" not in train["metadata"] and "readinessProbe" not in train["spec"]["containers"][0]


def test_a_serve_job_that_kubernetes_could_not_reach_is_refused_with_the_fix() -> None:
    p = run_cli("plan", str(ROOT / "jobs" / "serve.yaml"), "--backend", "kubernetes", "--set", "server.port=8000")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "serve.yaml:13:3: error: server.host: host 127.0.0.1 is reachable only inside the pod" in p.stderr, p.stderr
    assert "set server.host: 0.0.0.0" in p.stderr
    p = run_cli("plan", str(ROOT / "jobs" / "serve.yaml"), "--backend", "kubernetes", "--set", "server.host=0.0.0.0")
    assert p.returncode == 2 and "serve.yaml:14:3: error: server.port: port 0 (any free port) cannot work" in p.stderr
    assert run_cli("plan", str(ROOT / "jobs" / "serve.yaml")).returncode == 0  # loopback is right locally


def test_indexed_job_one_pod_per_node_with_rank_from_completion_index() -> None:
    k = _by_kind(_manifests())
    job = k["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == 4 and job["parallelism"] == 4
    pod = job["template"]["spec"]
    c = pod["containers"][0]
    assert 'RUNNER_NODE_RANK="${JOB_COMPLETION_INDEX}"' in c["command"][2]
    env = {e["name"]: e.get("value") for e in c["env"]}
    name = object_name("train-72b-4node", RUN_ID)
    # Rank 0's stable DNS name through the headless Service named like the pods' subdomain.
    assert env["RUNNER_MASTER_ADDR"] == f"{name}-0.{name}.default.svc"
    assert pod["subdomain"] == name == k["Service"]["metadata"]["name"]
    assert k["Service"]["spec"]["clusterIP"] == "None"
    assert k["Service"]["spec"]["selector"] == {"qa-runner/run": RUN_ID}
    assert job["template"]["metadata"]["labels"]["qa-runner/run"] == RUN_ID
    assert env["RUNNER_NNODES"] == "4" and env["RUNNER_MASTER_PORT"] == "29500"
    # The launch line gives every pod its rank and the rendezvous address.
    entry = k["ConfigMap"]["data"]["entrypoint.sh"]
    assert '--machine_rank "${RUNNER_NODE_RANK}" --main_process_ip "${RUNNER_MASTER_ADDR}"' in entry
    assert "num_machines: 4" in k["ConfigMap"]["data"]["accelerate.yaml"]
    job_yaml = YAML(typ="safe").load(k["ConfigMap"]["data"]["job.yaml"])
    assert job_yaml["name"] == "train-72b-4node" and job_yaml["spec_hash"]


def test_amd_gpus_host_ipc_unconfined_seccomp_and_shm() -> None:
    pod = _by_kind(_manifests())["Job"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["amd.com/gpu"] == "8"
    assert pod["hostIPC"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "Unconfined"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/dev/shm"]["name"] == "dshm"
    assert mounts["/workspace/run"]["subPath"] == f"runs/train-72b-4node/{RUN_ID}"
    assert mounts["/workspace/cache"]["subPath"] == "cache"
    claim = next(v for v in pod["volumes"] if v["name"] == "runs")["persistentVolumeClaim"]["claimName"]
    assert claim == "qa-runner-runs"
    assert pod["terminationGracePeriodSeconds"] >= 120  # time to checkpoint after SIGTERM


def test_cuda_flavour_asks_for_nvidia_gpus_and_existing_claim_is_not_created() -> None:
    docs = _manifests(
        "image=cuda", "resources.kubernetes.volume_claim=team-nfs", "resources.container.registry=registry.example.com/qa"
    )
    k = _by_kind(docs)
    assert "PersistentVolumeClaim" not in k
    c = k["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and "amd.com/gpu" not in c["resources"]["limits"]
    assert c["image"].startswith("registry.example.com/qa/qa-runner-cuda:")
    for d in docs:
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)


def test_secrets_are_referenced_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    plan = plan_for(load_job(JOB_4NODE, [], "kubernetes"), "kubernetes")
    assert "hf_secret_value" not in plan.files["kubernetes.yaml"]
    c = _by_kind(manifests_for_run(plan.files["kubernetes.yaml"], RUN_ID))["Job"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in c["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": object_name("train-72b-4node", RUN_ID),
        "key": "HF_TOKEN",
    }


def test_names_are_valid_dns_labels() -> None:
    assert k8s_name("Train_72B.v2") == "train-72b-v2"
    assert k8s_name("7b-run") == "qa-7b-run"
    long = object_name("a" * 63, RUN_ID)
    assert len(long + "-127") <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", long)


def test_no_kubeconfig_is_an_environment_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    plan = plan_for(load_job(JOB_4NODE, [], "kubernetes"), "kubernetes")
    with pytest.raises(EnvironmentProblem, match="no Kubernetes cluster configured"):
        get_backend("kubernetes").check(plan)
    p = run_cli(
        "run", str(JOB_4NODE), "--backend", "kubernetes", env={"KUBECONFIG": str(tmp_path / "missing")}
    )
    assert (
        p.returncode == 3 and "no Kubernetes cluster configured" in p.stderr and "Traceback" not in p.stderr
    )


# --- apply / follow / cancel against a fake API server ------------------------------------------------


class FakeCluster:
    """Just enough of the Kubernetes REST API for the backend: objects by path, a Job that runs its pod."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.log = b"trainer: rank 0 step 1\ntrainer: done\n"
        self.exit_code = 0
        self.lock = threading.Lock()

    def finish_job(self, name: str, ns: str = "default") -> None:
        with self.lock:
            job = self.objects[f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"]
            ok = self.exit_code == 0
            job["status"] = {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True"}]}
            pod = self.objects[f"/api/v1/namespaces/{ns}/pods/{name}-0-abcde"]
            pod["status"] = {
                "phase": "Succeeded" if ok else "Failed",
                "containerStatuses": [
                    {
                        "name": "workload",
                        "ready": False,
                        "restartCount": 0,
                        "image": "x",
                        "imageID": "",
                        "state": {"terminated": {"exitCode": self.exit_code}},
                    }
                ],
            }

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        self.calls.append((method, path))
        path, _, query = path.partition("?")
        path = path.rstrip("/")
        selector = dict(urllib.parse.parse_qsl(query)).get("labelSelector", "")
        want = dict(kv.split("=", 1) for kv in selector.split(",") if "=" in kv)
        with self.lock:
            if method == "GET" and path == "/version":
                return 200, {
                    "major": "1",
                    "minor": "33",
                    "gitVersion": "v1.33.0",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            if method == "POST":
                assert body is not None
                key = f"{path}/{body['metadata']['name']}"
                if key in self.objects:
                    return 409, {
                        "kind": "Status",
                        "status": "Failure",
                        "reason": "AlreadyExists",
                        "code": 409,
                    }
                self.objects[key] = body
                if body["kind"] == "Job":
                    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
                    body["status"] = {"active": 1}
                    self.objects[f"/api/v1/namespaces/{ns}/pods/{name}-0-abcde"] = {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": f"{name}-0-abcde",
                            "namespace": ns,
                            "labels": {"job-name": name},
                            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                        },
                        "status": {"phase": "Running"},
                    }
                return 201, body
            if method == "GET" and path.endswith("/log"):
                return 200, self.log
            if method == "GET" and path.endswith("/pods"):
                items = [
                    o
                    for k, o in self.objects.items()
                    if k.startswith(path + "/") and want.items() <= o["metadata"].get("labels", {}).items()
                ]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if method == "GET":
                return (
                    (200, self.objects[path])
                    if path in self.objects
                    else (404, {"kind": "Status", "code": 404})
                )
            if method == "DELETE":
                if self.objects.pop(path, None) is None:
                    return 404, {"kind": "Status", "code": 404}
                for k in [k for k in self.objects if "/pods/" in k and path.rsplit("/", 1)[1] in k]:
                    del self.objects[k]
                return 200, {"kind": "Status", "status": "Success"}
        return 405, {}


@pytest.fixture
def fake_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCluster]:
    cluster = FakeCluster()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            code, out = cluster.handle(method, self.path, body)
            data = out if isinstance(out, bytes) else json.dumps(out).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(out, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._reply("GET")

        def do_POST(self) -> None:
            self._reply("POST")

        def do_DELETE(self) -> None:
            self._reply("DELETE")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [
                    {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield cluster
    server.shutdown()


def _start(cluster: FakeCluster) -> tuple[Any, Any, Any]:
    job = load_job(JOB_4NODE, [], "kubernetes")
    plan = plan_for(job, "kubernetes")
    backend = get_backend("kubernetes")
    backend.check(plan)
    run = RunStore().create(job, plan)
    run.set_state("running")
    handle = backend.start(plan, run, attach=False)
    return run, handle, backend


def test_start_applies_in_order_follows_rank0_and_succeeds(fake_cluster: FakeCluster) -> None:
    run, handle, backend = _start(fake_cluster)
    name = run.status()["backend_ref"]["job"]
    posts = [p for m, p in fake_cluster.calls if m == "POST"]
    assert [p.rsplit("/", 1)[1] for p in posts] == [
        "secrets",
        "persistentvolumeclaims",
        "services",
        "configmaps",
        "jobs",
    ]
    assert backend.poll(run) == ("running", None)
    threading.Timer(1.0, fake_cluster.finish_job, args=(name,)).start()
    assert handle.wait() == 0
    assert "trainer: done" in run.log_path.read_text()
    assert backend.poll(run) == ("succeeded", 0)


def test_a_second_run_reuses_the_shared_volume(fake_cluster: FakeCluster) -> None:
    _start(fake_cluster)
    run2, _, _ = _start(fake_cluster)  # the claim exists (409) and is reused
    assert run2.status()["backend_ref"]["job"].startswith("train-72b-4node-")


def test_failed_rank0_exit_code_maps_to_failed_and_130_to_cancelled(fake_cluster: FakeCluster) -> None:
    run, handle, backend = _start(fake_cluster)
    fake_cluster.exit_code = 3
    fake_cluster.finish_job(run.status()["backend_ref"]["job"])
    assert handle.wait() == 3 and backend.poll(run) == ("failed", 3)
    run2, _, _ = _start(fake_cluster)
    fake_cluster.exit_code = 130
    fake_cluster.finish_job(run2.status()["backend_ref"]["job"])
    assert backend.poll(run2) == ("cancelled", 130)


def test_cancel_deletes_the_job_and_its_objects(fake_cluster: FakeCluster) -> None:
    run, handle, backend = _start(fake_cluster)
    name = run.status()["backend_ref"]["job"]
    run.update(cancel_requested=True)
    backend.cancel(run, grace_s=60)
    deletes = [p for m, p in fake_cluster.calls if m == "DELETE" and p.split("?")[0].endswith("/" + name)]
    assert {p.split("?")[0].rsplit("/", 2)[1] for p in deletes} >= {
        "jobs",
        "services",
        "configmaps",
        "secrets",
    }
    assert not any(k.endswith("/jobs/" + name) for k in fake_cluster.objects)
    assert backend.poll(run) == ("cancelled", 130)
    assert handle.wait() == 130
