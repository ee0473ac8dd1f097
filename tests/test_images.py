"""Image definitions: rendered Dockerfiles, pinned bases, and tags that change exactly when the image would."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from runner import images
from runner.images import ImageError, render_image

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_image_installs_offline_from_local_wheels_in_a_build_stage() -> None:
    ref = render_image("cpu")
    df = ref.dockerfile
    assert ref.flavour == "cpu" and ref.base == "qa-runner-base:bookworm-2"
    assert re.fullmatch(r"qa-runner-cpu:[0-9a-f]{12}", ref.tag)
    froms = re.findall(r"^FROM (\S+)", df, flags=re.M)
    assert froms == ["qa-runner-base:bookworm-2", "qa-runner-base:bookworm-2"]  # wheels never reach the final image
    assert "--no-index --find-links /tmp/wheels" in df
    assert "torch==2.13.0+cpu" in df
    assert "COPY --from=deps /opt/venv /opt/venv" in df
    # The project is in the image and importable there: the container runs the same code.
    assert "COPY project/ /opt/qa-runner/" in df and "PYTHONPATH=/opt/qa-runner" in df
    assert "import torch, transformers, peft, accelerate, runner.spec" in df


def test_rocm_image_pins_its_base_and_never_reinstalls_torch() -> None:
    ref = render_image("rocm")
    df = ref.dockerfile
    assert re.fullmatch(r"rocm/pytorch:rocm6\.2\.\d+_ubuntu\d\d\.\d\d_py3\.\d+_pytorch_release_[\d.]+", ref.base)
    assert df.count("FROM ") == 1 and f"FROM {ref.base}" in df
    assert "latest" not in ref.base
    install = [ln for ln in df.splitlines() if "pip install" in ln]
    assert install and all("-c /etc/qa-runner-constraints.txt" in ln for ln in install)
    pkgs = df[df.index("pip install"):df.index("torch.version.hip")]
    assert not re.search(r"(?<![\w-])torch[=<>]", pkgs.replace("constraints", "")), "torch must never be installed"
    assert "torch.version.hip is not None" in df  # the build fails on a CUDA or CPU torch
    assert "bitsandbytes" not in pkgs


def test_cuda_image_checks_for_a_cuda_torch() -> None:
    ref = render_image("cuda")
    assert ref.base.startswith("nvcr.io/nvidia/pytorch:") and "latest" not in ref.base
    assert "torch.version.cuda is not None" in ref.dockerfile


def test_tag_is_stable_and_follows_dockerfile_source_and_wheels(tmp_path: Path) -> None:
    imgs = tmp_path / "images"
    shutil.copytree(ROOT / "images", imgs, ignore=shutil.ignore_patterns(".wheels"))
    root = tmp_path / "root"
    shutil.copytree(ROOT / "runner", root / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "demo-1.0-py3-none-any.whl").write_bytes(b"x" * 10)

    def tag() -> str:
        return render_image("cpu", images_dir=imgs, root=root, wheels_dir=wheels).tag

    t0 = tag()
    assert tag() == t0, "rendering twice must give the same tag"
    (root / "runner" / "__pycache__").mkdir(exist_ok=True)
    (root / "runner" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert tag() == t0, "bytecode caches are not inputs"

    (root / "runner" / "__init__.py").write_text((root / "runner" / "__init__.py").read_text() + "\n# changed\n")
    t1 = tag()
    assert t1 != t0, "a source change must give a new image"

    (wheels / "demo-1.1-py3-none-any.whl").write_bytes(b"y")
    t2 = tag()
    assert t2 != t1, "a new wheel must give a new image"

    y = imgs / "cpu.yaml"
    y.write_text(y.read_text().replace('PYTHONDONTWRITEBYTECODE: "1"', 'PYTHONDONTWRITEBYTECODE: "1"\n  X: "1"'))
    assert tag() != t2, "a changed definition must give a new image"
    # The rocm image does not install local wheels: they are not among its inputs.
    r0 = render_image("rocm", images_dir=imgs, root=root, wheels_dir=wheels).tag
    (wheels / "demo-1.2-py3-none-any.whl").write_bytes(b"z")
    assert render_image("rocm", images_dir=imgs, root=root, wheels_dir=wheels).tag == r0


def test_unknown_and_invalid_definitions_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no image definition .*nope\.yaml; known images: .*cpu"):
        render_image("nope")
    (tmp_path / "bad.yaml").write_text("flavour: cpu\nbase: x:1\npackages: [a]\npakages: [b]\n")
    with pytest.raises(ImageError, match=r"bad\.yaml: pakages: Extra inputs are not permitted"):
        render_image("bad", images_dir=tmp_path)


def test_build_context_has_dockerfile_project_and_wheels() -> None:
    ref = render_image("cpu")
    buf = io.BytesIO()
    images.write_context(ref, buf)
    buf.seek(0)
    names = tarfile.open(fileobj=buf).getnames()
    assert "Dockerfile" in names
    assert "project/runner/workloads/__main__.py" in names and "project/pyproject.toml" in names
    assert not any("__pycache__" in n or n.startswith("project/tests") for n in names)
    assert any(n.startswith("wheels/") for n in names)


def test_image_cli_prints_tag_and_dockerfile(capsys: pytest.CaptureFixture[str]) -> None:
    assert images.main(["tag", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == render_image("cpu").tag
    assert images.main(["dockerfile", "rocm"]) == 0
    assert "FROM rocm/pytorch:rocm6.2" in capsys.readouterr().out
    assert images.main(["bogus", "cpu"]) == 2
