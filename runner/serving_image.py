"""Serving images of registry versions: `<name>:v<N>` FROM the version's job image, with the version baked in at
SERVING_ROOT and a `serve` job that loads it. The Docker SDK is imported only when an engine is needed."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ruamel.yaml import YAML

from runner import images
from runner.registry.store import EXIT_ENV, EXIT_REFUSED, RegistryError
from runner.spec import job_from_data
from runner.spec.models import NAME_RE as JOB_NAME_RE
from runner.spec.models import OFFLINE_BASE_MARKERS
from runner.spec.serve import ServeJob
from runner.templating import render_template

SERVING_ROOT = "/srv/qa-runner/artifact"
SERVING_JOB = "/srv/qa-runner/serve.yaml"
SERVING_PORT = 8000


def docker_client() -> Any:
    """A Docker client that answers; RegistryError (exit 3) when there is no SDK or no engine."""
    try:
        import docker
    except ImportError:
        raise RegistryError("the `docker` Python package is missing; `pip install docker`", EXIT_ENV) from None
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as e:
        raise RegistryError(f"no Docker engine answers ({e.__class__.__name__}); start dockerd or drop --image",
                            EXIT_ENV) from None
    return client


def serve_job_data(name: str, version: int) -> ServeJob | None:
    """The `serve` job baked into the serving image of `name:v<version>`: it loads the artifact at SERVING_ROOT
    and listens on 0.0.0.0:SERVING_PORT. None when `<name>-v<version>` is too long for a job name."""
    job_name = f"{name}-v{version}"
    if not JOB_NAME_RE.match(job_name):
        # A registry name near its 63-character limit leaves no room for `-vN`: such an image carries no
        # serve job (its entrypoint says to mount one), as it always has.
        return None
    data = {"kind": "serve", "name": job_name, "registry": SERVING_ROOT,
            "server": {"host": "0.0.0.0", "port": SERVING_PORT}}
    return cast(ServeJob, job_from_data(data, SERVING_JOB).spec)


def serve_job_yaml(job: ServeJob) -> str:
    """The job file for `job`: the settings it was given (defaults left out), `kind` and `name` first."""
    given = job.model_dump(mode="json", exclude_unset=True)
    data = {"kind": given.pop("kind"), "name": given.pop("name"), **given}
    buf = io.StringIO()
    YAML().dump(data, buf)
    return buf.getvalue()


def render_serving_files(base_tag: str, name: str, version: int, manifest: dict[str, Any]) -> dict[str, str]:
    """Dockerfile, entrypoint and (when a serve job fits) serve.yaml of a version's serving image."""
    serve = serve_job_data(name, version)
    values = dict(
        base=base_tag, name=name, version=version, artifact=SERVING_ROOT, port=SERVING_PORT,
        serve_job=SERVING_JOB if serve else "", source_run=manifest["source"]["run"],
        spec_hash=manifest["source"]["spec_hash"] or "", base_model=manifest["base_model"]["base"],
        merged=bool(manifest.get("merged")),
    )
    files = {"Dockerfile": render_template("serving.Dockerfile.j2", **values),
             "serve-entrypoint.sh": render_template("serving-entrypoint.sh.j2", **values)}
    if serve:
        files["serve.yaml"] = serve_job_yaml(serve)
    return files


def build_serving_image(vdir: Path, manifest: dict[str, Any], name: str, version: int,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build `<name>:v<version>` FROM the job's image flavour with the version's files at SERVING_ROOT;
    `log` receives the build's progress."""
    base = manifest.get("base_model") or {}
    if not base.get("bundled") and not manifest.get("merged") and Path(str(base.get("base"))).is_absolute():
        raise RegistryError(
            f"the base model {base.get('base')} is a directory on this machine and is not in the version, so a "
            "container could not load the adapter; add --merge (the image then carries full merged weights)")
    if not base.get("bundled") and not manifest.get("merged") and base.get("base") in OFFLINE_BASE_MARKERS:
        raise RegistryError(
            f"{name}:v{version} was promoted without its {base.get('base')} base bundled (it lives only in this "
            "machine's cache), so a container could not load the adapter; promote the run again (promotion bundles "
            "an offline base) or add --merge", EXIT_REFUSED)
    client = docker_client()
    flavour = str(manifest.get("image_flavour") or "cpu")
    say = log or (lambda _text: None)
    try:
        base_ref = images.render_image(flavour)
        images.ensure_image(base_ref, client, log=say)
    except Exception as e:
        raise RegistryError(f"the {flavour} image this version's job runs on is not available: {e}", EXIT_ENV) from None
    files = render_serving_files(base_ref.tag, name, version, manifest)
    tag = f"{name}:v{version}"
    with tempfile.TemporaryDirectory(prefix="qa-runner-serving-") as ctx_s:
        ctx = Path(ctx_s)
        shutil.copytree(vdir, ctx / "artifact")
        for fn, text in files.items():
            (ctx / fn).write_text(text)
        say(f"registry: building serving image {tag} (FROM {base_ref.tag})\n")
        try:
            img, _logs = client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True, network_mode="none",
                                             labels={"qa-runner.registry": tag,
                                                     "qa-runner.source-run": manifest["source"]["run"]})
        except Exception as e:
            detail = "".join(str(x.get("stream", "")) for x in getattr(e, "build_log", []) or [])[-2000:]
            raise RegistryError(f"building the serving image {tag} failed: {e}\n{detail}", EXIT_REFUSED) from None
    return {"id": img.id, "tag": tag, "base": base_ref.tag, "flavour": flavour, "artifact_path": SERVING_ROOT,
            "serve_job": SERVING_JOB if "serve.yaml" in files else None, "dockerfile": files["Dockerfile"]}


def tag_image(image_id: str, tag: str) -> None:
    client = docker_client()
    repo, t = tag.split(":", 1)
    client.images.get(image_id).tag(repo, t)
