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
from runner.spec import job_from_stored
from runner.spec.loader import put_templates
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


# What a serve job given to `promote --image --serve` may not carry into an image: where its weights come from
# (the image serves its own version), where and how it runs (the image is the place), and what it is called.
NOT_BAKED = ("kind", "name", "registry", "model", "adapter", "backend", "image", "resources", "tags")


class ServeTemplate:
    """The settings of a serve job (`promote --image --serve FILE`) that a serving image runs with: its engine and
    the engine's flags, prompt, agents, server limits and device. Built from a validated job; refuses what an
    image could not serve (another model beside the version, files on this machine, a token written in the file)."""

    def __init__(self, job: Any) -> None:
        spec = job.spec
        where = str(job.source)
        if not isinstance(spec, ServeJob):
            raise RegistryError(f"--serve {where}: a `serve` job file is needed (this one is kind {job.kind})")
        if spec.engine == "llamacpp":
            raise RegistryError(f"--serve {where}: engine llamacpp runs on the local backend only (no image ships "
                                "llama-cpp-python); serve the version's GGUF with a local serve job, or use engine "
                                "vllm / builtin for an image")
        if spec.ensemble:
            raise RegistryError(f"--serve {where}: ensemble names models that are not in this version; an image "
                                "serves its own version only (drop `ensemble`)")
        if spec.question.bank:
            raise RegistryError(f"--serve {where}: question.bank reads files on this machine that the image would "
                                "not have; drop the bank source, or mount the files and the job (RUNNER_SERVE_JOB)")
        if spec.vllm.python is not None:
            raise RegistryError(f"--serve {where}: vllm.python names a Python on this machine; the image runs its "
                                "own vLLM (drop vllm.python)")
        if spec.server.token is not None and "server.token" not in job.templates:
            raise RegistryError(f"--serve {where}: server.token is written in the file and an image would carry "
                                "it; write `token: ${env:QA_TOKEN}` and pass QA_TOKEN to `docker run`")
        given = spec.model_dump(mode="json", exclude_unset=True)
        self.data = {k: v for k, v in _pick(job.stored_data(), given).items() if k not in NOT_BAKED}
        server = {k: v for k, v in (self.data.get("server") or {}).items() if k not in ("host", "port")}
        self.data["server"] = server
        # Its `${env:...}` values (a token), by dotted path: the baked job keeps them as templates.
        self.templates = {k: v for k, v in job.templates.items()
                          if k.split(".")[0] not in NOT_BAKED and k not in ("server.host", "server.port")}
        self.engine = str(spec.engine)
        # The image flavour: the serve job's own `image` when it sets one, else the promoted job's.
        self.flavour = str(spec.image) if "image" in given else None
        self.source = where


def _pick(values: Any, given: Any) -> Any:
    """`values` restricted to the keys present in `given` (the settings a job file set), recursively."""
    if isinstance(given, dict) and isinstance(values, dict):
        return {k: _pick(values[k], g) for k, g in given.items() if k in values}
    return values


def serve_job_data(name: str, version: int, template: ServeTemplate | None = None) -> ServeJob | None:
    """The `serve` job baked into the serving image of `name:v<version>`: it loads the artifact at SERVING_ROOT
    and listens on 0.0.0.0:SERVING_PORT, with `template`'s engine and settings when given (the builtin engine
    and defaults otherwise). None when `<name>-v<version>` is too long for a job name."""
    job_name = f"{name}-v{version}"
    if not JOB_NAME_RE.match(job_name):
        # A registry name near its 63-character limit leaves no room for `-vN`: such an image carries no
        # serve job (its entrypoint says to mount one), as it always has.
        if template is not None:
            raise RegistryError(f"--serve: the registry name {name!r} leaves no room for the serve job's name "
                                f"{job_name!r} (63 characters at most); promote to a shorter name")
        return None
    data = {"kind": "serve", "name": job_name, "registry": SERVING_ROOT, **(template.data if template else {})}
    data["server"] = {"host": "0.0.0.0", "port": SERVING_PORT, **data.get("server", {})}
    return cast(ServeJob, job_from_stored(data, SERVING_JOB).spec)


def serve_job_yaml(job: ServeJob, templates: dict[str, str] | None = None) -> str:
    """The job file for `job`: the settings it was given (defaults left out), `kind` and `name` first;
    `${env:...}` values (a token) written as their templates, so the image holds no secret."""
    given = put_templates(job.model_dump(mode="json", exclude_unset=True), templates or {})
    data = {"kind": given.pop("kind"), "name": given.pop("name"), **given}
    buf = io.StringIO()
    YAML().dump(data, buf)
    return buf.getvalue()


def render_serving_files(base_tag: str, name: str, version: int, manifest: dict[str, Any],
                         template: ServeTemplate | None = None) -> dict[str, str]:
    """Dockerfile, entrypoint and (when a serve job fits) serve.yaml of a version's serving image."""
    serve = serve_job_data(name, version, template)
    values = dict(
        base=base_tag, name=name, version=version, artifact=SERVING_ROOT, port=SERVING_PORT,
        serve_job=SERVING_JOB if serve else "", source_run=manifest["source"]["run"],
        spec_hash=manifest["source"]["spec_hash"] or "", base_model=manifest["base_model"]["base"],
        merged=bool(manifest.get("merged")), engine=template.engine if template else "builtin",
    )
    files = {"Dockerfile": render_template("serving.Dockerfile.j2", **values),
             "serve-entrypoint.sh": render_template("serving-entrypoint.sh.j2", **values)}
    if serve:
        files["serve.yaml"] = serve_job_yaml(serve, template.templates if template else None)
    return files


def serving_base(manifest: dict[str, Any], template: ServeTemplate | None) -> str:
    """The image a serving image is built FROM: the promoted job's flavour (or the serve job's `image`), and its
    vLLM variant (`IMAGE-vllm`) when the serve job's engine is vllm."""
    flavour = (template.flavour if template else None) or str(manifest.get("image_flavour") or "cpu")
    if template is None or template.engine != "vllm":
        return flavour
    name = f"{flavour}-vllm"
    if not (images.IMAGES_DIR / f"{name}.yaml").is_file():
        raise RegistryError(f"--serve {template.source}: engine vllm has no image for flavour {flavour} "
                            f"(no images/{name}.yaml)")
    return name


def build_serving_image(vdir: Path, manifest: dict[str, Any], name: str, version: int,
                        log: Callable[[str], None] | None = None,
                        template: ServeTemplate | None = None) -> dict[str, Any]:
    """Build `<name>:v<version>` FROM the job's image flavour (its vLLM variant for a `template` with engine
    vllm) with the version's files at SERVING_ROOT; `log` receives the build's progress."""
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
    flavour = serving_base(manifest, template)
    client = docker_client()
    say = log or (lambda _text: None)
    try:
        base_ref = images.render_image(flavour)
        images.ensure_image(base_ref, client, log=say)
    except Exception as e:
        raise RegistryError(f"the {flavour} image this version's job runs on is not available: {e}", EXIT_ENV) from None
    files = render_serving_files(base_ref.tag, name, version, manifest, template)
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
            "engine": template.engine if template else "builtin",
            "serve_job": SERVING_JOB if "serve.yaml" in files else None, "dockerfile": files["Dockerfile"]}


def tag_image(image_id: str, tag: str) -> None:
    client = docker_client()
    repo, t = tag.split(":", 1)
    client.images.get(image_id).tag(repo, t)
