"""Registry artifacts as models: load a promoted version (verified), merge an adapter into full weights, bundle
a named offline base (`tiny`, `smollm2-135m`) into a version. The command-line steps around these live in `recipes/artifact.py`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from runner.registry import RegistryError, read_manifest, resolve_artifact
from runner.spec.models import ModelSpec


def _model_spec(vdir: Path) -> ModelSpec:
    """The source run's `model:` section, with `base` pointing at the bundled copy when there is one.
    (Also used on a version still being assembled, before its manifest exists.)"""
    from ruamel.yaml import YAML

    job = YAML(typ="safe").load((vdir / "source" / "job.yaml").read_text()) or {}
    manifest = read_manifest(vdir) if (vdir / "manifest.json").is_file() else None
    if job.get("model"):
        spec = ModelSpec.model_validate(job["model"])
    elif manifest is not None:
        spec = ModelSpec(base=manifest["base_model"]["base"])
    else:
        raise RegistryError(f"{vdir / 'source' / 'job.yaml'} names no model")
    bundled = (manifest.get("base_model") or {}).get("bundled") if manifest else ("base" if (vdir / "base").is_dir() else None)
    if bundled:
        spec = spec.model_copy(update={"base": str(vdir / bundled)})
    return spec.model_copy(update={"gradient_checkpointing": False})


def _tokenizer(vdir: Path, fallback: Any) -> Any:
    from transformers import AutoTokenizer

    for sub in ("tokenizer", "adapter", "merged"):
        d = vdir / sub
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d))
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
    return fallback


def load_artifact(
    ref: str | os.PathLike[str], device: str = "cpu", *, merged: bool | None = None, verify: bool = True
) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, manifest) of a registry version (`NAME@alias`, `NAME:vN`, or a directory).

    The files are re-hashed against the manifest first (IntegrityError names the files that differ).
    `merged=None` uses the merged weights when the version has them, else base + adapter.
    """
    from runner.workloads.model.loading import load_adapter, load_model_and_tokenizer
    from runner.workloads.scoring.prompts import remember_prompt

    vdir = resolve_artifact(ref, verify=verify)
    manifest = read_manifest(vdir)
    spec = _model_spec(vdir)
    has_merged = bool(manifest.get("merged")) and (vdir / "merged").is_dir()
    if merged and not has_merged:
        raise RegistryError(f"{vdir} has no merged weights; promote with --merge")
    if has_merged and merged is not False:
        model, tok = load_model_and_tokenizer(spec.model_copy(update={"base": str(vdir / "merged")}), device)
        remember_prompt(model, vdir / "adapter")  # the style the merged adapter was trained with
        return model, _tokenizer(vdir, tok), manifest
    base, tok = load_model_and_tokenizer(spec, device)
    model = load_adapter(base, vdir / "adapter", trainable=False)
    model.eval()
    remember_prompt(model, vdir / "adapter")
    return model, _tokenizer(vdir, tok), manifest


def merge(vdir: Path, out: Path) -> None:
    """Full weights with the adapter folded in (safetensors) + the tokenizer, written to `out`."""
    from runner.workloads.model.loading import load_adapter, load_model_and_tokenizer

    spec = _model_spec(vdir)
    base, tok = load_model_and_tokenizer(spec, "cpu")
    model = load_adapter(base, vdir / "adapter", trainable=False).merge_and_unload()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _tokenizer(vdir, tok).save_pretrained(str(tmp))
    os.rename(tmp, out)


def bundle_base(job_yaml: Path, out: Path) -> None:
    """Copy the cached offline base (model + tokenizer) that the run trained on into `out`: the version then loads
    with no cache and no network. The registry's manifest hashes every copied file."""
    from ruamel.yaml import YAML

    from runner.workloads.model.loading import OFFLINE_BASES, base_model_path

    job = YAML(typ="safe").load(job_yaml.read_text()) or {}
    spec = ModelSpec.model_validate(job["model"])
    if spec.base not in OFFLINE_BASES:
        raise RegistryError(f"{job_yaml}: model.base {spec.base!r} is not a named offline base "
                            f"({', '.join(sorted(OFFLINE_BASES))}); only those are bundled")
    src = Path(base_model_path(spec, log=lambda m: print(m, file=sys.stderr)))
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.lock", ".tmp-*", ".*"))

