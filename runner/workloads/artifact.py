"""Registry artifacts inside workloads: load a promoted version (verified) as a model, merge an adapter into full
weights, bundle the tiny base, and answer one question from the command line.

    python -m runner.workloads.artifact answer REF_OR_DIR --question '{"question": ..., "choices": [...]}'
    python -m runner.workloads.artifact answer REF_OR_DIR --mmlu FILE.csv --index N
    python -m runner.workloads.artifact merge VERSION_DIR OUT_DIR        (used by `runner promote --merge`)
    python -m runner.workloads.artifact bundle-base JOB_YAML OUT_DIR     (used by `runner promote` for `tiny`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from runner.registry import IntegrityError, RegistryError, read_manifest, resolve_artifact
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
    from runner.workloads.modeling import load_adapter, load_model_and_tokenizer

    vdir = resolve_artifact(ref, verify=verify)
    manifest = read_manifest(vdir)
    spec = _model_spec(vdir)
    has_merged = bool(manifest.get("merged")) and (vdir / "merged").is_dir()
    if merged and not has_merged:
        raise RegistryError(f"{vdir} has no merged weights; promote with --merge")
    if has_merged and merged is not False:
        model, tok = load_model_and_tokenizer(spec.model_copy(update={"base": str(vdir / "merged")}), device)
        return model, _tokenizer(vdir, tok), manifest
    base, tok = load_model_and_tokenizer(spec, device)
    model = load_adapter(base, vdir / "adapter", trainable=False)
    model.eval()
    return model, _tokenizer(vdir, tok), manifest


def merge(vdir: Path, out: Path) -> None:
    """Full weights with the adapter folded in (safetensors) + the tokenizer, written to `out`."""
    from runner.workloads.modeling import load_adapter, load_model_and_tokenizer

    spec = _model_spec(vdir)
    base, tok = load_model_and_tokenizer(spec, "cpu")
    model = load_adapter(base, vdir / "adapter", trainable=False).merge_and_unload()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _tokenizer(vdir, tok).save_pretrained(str(tmp))
    os.rename(tmp, out)


def bundle_base(job_yaml: Path, out: Path) -> None:
    """Copy the cached tiny base (model + tokenizer) that the run trained on into `out`."""
    from ruamel.yaml import YAML

    from runner.workloads.modeling import base_model_path

    job = YAML(typ="safe").load(job_yaml.read_text()) or {}
    spec = ModelSpec.model_validate(job["model"])
    src = Path(base_model_path(spec, log=lambda m: print(m, file=sys.stderr)))
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.lock", ".tmp-*"))


def answer(model: Any, tokenizer: Any, question: str, choices: list[str]) -> dict[str, Any]:
    from runner.workloads.prompts import LETTERS
    from runner.workloads.scoring import score_mcq

    class _Item:
        def __init__(self) -> None:
            self.question, self.choices = question, choices

    probs = score_mcq(model, tokenizer, [_Item()], batch_size=1)[0]
    k = int(probs.argmax())
    return {"answer": LETTERS[k], "confidence": round(float(probs[k]), 4),
            "probs": {LETTERS[i]: round(float(probs[i]), 4) for i in range(len(choices))}}


def _mmlu_item(path: Path, index: int) -> dict[str, Any]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    r = rows[index]
    return {"question": r[0], "choices": r[1:-1], "gold": r[-1].strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.workloads.artifact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("answer", help="Load a registry version and answer one question (prints JSON).")
    a.add_argument("ref", help="NAME@alias, NAME:vN, or a version directory.")
    a.add_argument("--question", help='JSON: {"question": ..., "choices": [...]}')
    a.add_argument("--mmlu", help="An MMLU CSV file (question,A,B,C,D,answer).")
    a.add_argument("--index", type=int, default=0, help="Row of --mmlu to answer.")
    m = sub.add_parser("merge", help="Write merged full weights of a version directory.")
    m.add_argument("vdir")
    m.add_argument("out")
    b = sub.add_parser("bundle-base", help="Copy the tiny base a run trained on.")
    b.add_argument("job_yaml")
    b.add_argument("out")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        if args.cmd == "merge":
            merge(Path(args.vdir), Path(args.out))
        elif args.cmd == "bundle-base":
            bundle_base(Path(args.job_yaml), Path(args.out))
        else:
            if args.mmlu:
                item = _mmlu_item(Path(args.mmlu), args.index)
            elif args.question:
                item = json.loads(args.question)
            else:
                ap.error("answer needs --question or --mmlu")
            model, tok, manifest = load_artifact(args.ref)
            out = answer(model, tok, str(item["question"]), [str(c) for c in item["choices"]])
            out["model"] = f"{manifest['name']}:v{manifest['version']}"
            if "gold" in item:
                out["gold"] = item["gold"]
            print(json.dumps(out))
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
