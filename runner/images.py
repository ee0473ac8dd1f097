"""Image definitions (images/<name>.yaml) -> rendered Dockerfile, content-addressed tag, and build-if-missing.

`render_image` is pure apart from reading the definition, the template and the files it hashes; nothing here
imports the Docker SDK at module level (the CLI stays fast). `python -m runner.images wheels|build|tag NAME`
fetches wheels, builds or prints the tag of an image.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.paths import PROJECT_ROOT
from runner.templating import render_template

IMAGES_DIR = PROJECT_ROOT / "images"
WHEELS_DIR = IMAGES_DIR / ".wheels"
TAG_PREFIX = "qa-runner-"
# What of the project goes into an image: the package and its metadata (never runs/, caches or tests).
PROJECT_FILES = ("pyproject.toml",)
PROJECT_PACKAGES = ("runner", "agents")  # agents/: the starter-kit file interface
KEEP_TAGS = 3  # builds of one image kept on the engine
GPU_CHECKS = {"rocm": "torch.version.hip is not None", "cuda": "torch.version.cuda is not None"}


@dataclass(frozen=True)
class ImageRef:
    name: str
    flavour: str
    tag: str
    dockerfile: str
    base: str



class ImageError(Exception):
    """An image definition is wrong or an image cannot be built; the message says what and how to fix it."""


class ImageDef(BaseModel):
    """One file in images/: where an image starts from and what goes into it."""

    model_config = ConfigDict(extra="forbid")
    flavour: Literal["cpu", "rocm", "cuda"] = Field(description="Hardware the image is for.")
    description: str = Field("", description="What the image is for.")
    base: str = Field(description="Base image (FROM), pinned to an exact tag.")
    base_hint: str = Field("", description="How to get the base image when it is not on this machine.")
    venv: str = Field("/opt/venv", description="Virtual environment the packages go into (local wheels only).")
    wheels: Literal["local", "index"] = Field(
        "index", description="`local`: install offline from images/.wheels/; `index`: pip's index at build time."
    )
    keep_preinstalled: list[str] = Field(
        default_factory=list, description="Packages of the base image pinned as they are (never reinstalled)."
    )
    packages: list[str] = Field(min_length=1, description="pip requirements to install.")
    remove: list[str] = Field(
        default_factory=list, description="Packages uninstalled after the install (ones a dependency pulls in that "
        "do not work with this image's torch)."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment baked into the image.")


def image_names(images_dir: Path = IMAGES_DIR) -> list[str]:
    """The images a job's `image:` can name: one per images/<name>.yaml."""
    return sorted(p.stem for p in images_dir.glob("*.yaml"))


def load_image_def(name: str, images_dir: Path = IMAGES_DIR) -> ImageDef:
    path = images_dir / f"{name}.yaml"
    if not path.is_file():
        known = image_names(images_dir)
        raise ImageError(f"no image definition {path}; known images: {', '.join(known) or 'none'}")
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        return ImageDef.model_validate(data)
    except YAMLError as e:
        raise ImageError(f"{path}: invalid YAML: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ImageError(f"{path}: {problems}") from None


def render_dockerfile(name: str, d: ImageDef) -> str:
    return render_template(
        "Dockerfile.j2", name=name, flavour=d.flavour, description=d.description, base=d.base, venv=d.venv,
        wheels=d.wheels, keep_preinstalled=d.keep_preinstalled, packages=d.packages, remove=d.remove, env=d.env,
        gpu_check=GPU_CHECKS.get(d.flavour, "True"),
    )


def project_files(root: Path = PROJECT_ROOT) -> list[tuple[str, Path]]:
    """(path in the image's /opt/qa-runner, host path) for the project source, sorted."""
    out = [(f, root / f) for f in PROJECT_FILES if (root / f).is_file()]
    for package in PROJECT_PACKAGES:
        for p in sorted((root / package).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed", ".json", ".txt", ".j2"):
                out.append((str(p.relative_to(root)), p))
    return out


def wheel_files(wheels_dir: Path = WHEELS_DIR) -> list[Path]:
    return sorted(p for p in wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []


def wheels_dir_of(name: str, wheels_dir: Path = WHEELS_DIR) -> Path:
    """Where an offline image's wheels live: images/.wheels/ for `cpu`, images/.wheels/NAME/ for the others (so
    a large image's wheels, vLLM's, neither enter the cpu image's build context nor change its tag)."""
    return wheels_dir if name == "cpu" else wheels_dir / name


def _hash_inputs(dockerfile: str, d: ImageDef, root: Path, wheels_dir: Path) -> str:
    h = hashlib.sha256(dockerfile.encode())
    for rel, p in project_files(root):
        h.update(f"\0src:{rel}\0".encode())
        h.update(p.read_bytes())
    if d.wheels == "local":
        for w in wheel_files(wheels_dir):
            # Wheel names carry name, version and build tag; the size catches a re-built file of the same name.
            h.update(f"\0whl:{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:12]


def render_image(name: str, images_dir: Path = IMAGES_DIR, root: Path = PROJECT_ROOT,
                 wheels_dir: Path = WHEELS_DIR) -> ImageRef:
    """The image `name` as it would be built: rendered Dockerfile, base and content-addressed tag."""
    d = load_image_def(name, images_dir)
    dockerfile = render_dockerfile(name, d)
    tag = f"{TAG_PREFIX}{name}:{_hash_inputs(dockerfile, d, root, wheels_dir_of(name, wheels_dir))}"
    return ImageRef(name=name, flavour=d.flavour, tag=tag, dockerfile=dockerfile, base=d.base)


# --- building ------------------------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, arcname: str, path: Path) -> None:
    info = tar.gettarinfo(str(path), arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    info.mtime = 0  # the context's bytes depend on content only
    with open(path, "rb") as f:
        tar.addfile(info, f)


def write_context(ref: ImageRef, out: Any, root: Path = PROJECT_ROOT, wheels_dir: Path = WHEELS_DIR) -> None:
    """The build context as an uncompressed tar: Dockerfile, project/ and (offline images) wheels/."""
    d = load_image_def(ref.name)
    wheels_dir = wheels_dir_of(ref.name, wheels_dir)
    with tarfile.open(fileobj=out, mode="w") as tar:
        _add_bytes(tar, "Dockerfile", ref.dockerfile.encode())
        for rel, p in project_files(root):
            _add_file(tar, f"project/{rel}", p)
        if d.wheels == "local":
            for w in wheel_files(wheels_dir):
                _add_file(tar, f"wheels/{w.name}", w)
            _add_bytes(tar, "wheels/.keep", b"")


def image_exists(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _check_inputs(ref: ImageRef, client: Any) -> None:
    d = load_image_def(ref.name)
    if not image_exists(client, ref.base):
        if d.wheels == "local":
            raise ImageError(f"base image {ref.base} of image {ref.name!r} is not on this machine; {d.base_hint}")
        import docker.errors

        try:
            client.images.pull(ref.base)
        except docker.errors.APIError as e:
            raise ImageError(
                f"base image {ref.base} of image {ref.name!r} is not on this machine and cannot be pulled "
                f"({e.explanation or e}); {d.base_hint}"
            ) from None
    if d.wheels == "local":
        where = wheels_dir_of(ref.name)
        have = {_req_name(w.name.split("-")[0]) for w in wheel_files(where)}
        missing = [p for p in d.packages if _req_name(p) not in have]
        if missing:
            raise ImageError(
                f"image {ref.name!r} installs offline but {where.relative_to(PROJECT_ROOT)}/ lacks "
                f"{', '.join(missing)}; "
                f"run `python -m runner.images wheels {ref.name}` (or images/local-base.sh)"
            )


def _req_name(req: str) -> str:
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<", "[", ";", " "):
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-").replace(".", "-")


def ensure_image(ref: ImageRef, client: Any, log: Callable[[str], None] | None = None) -> str:
    """The id of image `ref.tag`, building it first when this engine does not have it."""
    import docker.errors

    try:
        return str(client.images.get(ref.tag).id)
    except docker.errors.ImageNotFound:
        pass
    _check_inputs(ref, client)
    say = log or (lambda line: print(line, file=sys.stderr, end="", flush=True))
    say(f"runner: building image {ref.tag} (FROM {ref.base})\n")
    d = load_image_def(ref.name)
    with tempfile.TemporaryFile() as ctx:
        write_context(ref, ctx)
        ctx.seek(0)
        stream: Iterator[dict[str, Any]] = client.api.build(
            fileobj=ctx, custom_context=True, tag=ref.tag, rm=True, forcerm=True, pull=False, decode=True,
            # Offline images must build without any network: proves nothing is fetched at build time.
            network_mode="none" if d.wheels == "local" else None,
            labels={"qa-runner.image": ref.name, "qa-runner.flavour": ref.flavour},
        )
        tail: list[str] = []
        for chunk in stream:
            if "stream" in chunk:
                line = str(chunk["stream"])
                tail = (tail + [line])[-20:]
                say(line)
            elif "error" in chunk:
                detail = "".join(tail[-10:]).strip()
                raise ImageError(f"building image {ref.tag} failed: {chunk['error'].strip()}\n{detail}")
    try:
        image_id = str(client.images.get(ref.tag).id)
    except docker.errors.ImageNotFound:
        raise ImageError(f"building image {ref.tag} produced no image") from None
    prune_old_tags(ref, client)
    return image_id


def prune_old_tags(ref: ImageRef, client: Any, keep: int = KEEP_TAGS) -> list[str]:
    """Untag all but the newest `keep` builds of this image (each source change makes one); images in use stay."""
    import docker.errors

    repo = ref.tag.split(":")[0]
    builds = sorted(client.images.list(name=repo), key=lambda im: im.attrs.get("Created", ""), reverse=True)
    removed = []
    for im in builds[keep:]:
        for tag in im.tags:
            if tag.startswith(repo + ":") and tag != ref.tag:
                try:
                    client.images.remove(tag)
                    removed.append(tag)
                except docker.errors.APIError:
                    pass  # a container still uses it
    return removed


def download_wheels(name: str, wheels_dir: Path = WHEELS_DIR) -> int:
    """Fetch the wheels of an offline image with this host's pip (same Python and platform as the image)."""
    d = load_image_def(name)
    if d.wheels != "local":
        print(f"image {name!r} installs from an index at build time; nothing to download")
        return 0
    wheels_dir = wheels_dir_of(name, wheels_dir)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    stamp = wheels_dir / f".{name}.stamp"
    want = hashlib.sha256("\n".join(d.packages).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == want and wheel_files(wheels_dir):
        print(f"wheels for {name!r} already in {wheels_dir}")
        return 0
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels_dir),
           *d.packages]
    print(f"downloading wheels for {name!r} into {wheels_dir}")
    rc = subprocess.call(cmd)
    if rc == 0:
        stamp.write_text(want + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("wheels", "build", "tag", "dockerfile"):
        print("usage: python -m runner.images wheels|build|tag|dockerfile NAME", file=sys.stderr)
        return 2
    cmd, name = args
    try:
        if cmd == "wheels":
            return download_wheels(name)
        ref = render_image(name)
        if cmd == "tag":
            print(ref.tag)
            return 0
        if cmd == "dockerfile":
            print(ref.dockerfile, end="")
            return 0
        import docker

        try:
            client = docker.from_env(timeout=int(os.environ.get("RUNNER_DOCKER_TIMEOUT", "600")))
            client.ping()
        except docker.errors.DockerException as e:
            print(f"error: no Docker engine answers ({e}); start dockerd", file=sys.stderr)
            return 3
        image_id = ensure_image(ref, client)
        print(f"{ref.tag} {image_id}")
        return 0
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

