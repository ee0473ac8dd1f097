"""Promotion: a run's checkpoint assembled into a new immutable registry version (files, manifest, lineage, git),
gated when it moves an alias. Nothing here imports torch: merging and base bundling run
`python -m runner.workloads.recipes.artifact` in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.files import atomic_write, fsync_dir, sha256_file
from runner.paths import PROJECT_ROOT
from runner.registry.eval_jobs import eval_advice, shared_eval_advice
from runner.registry.evidence import Eval, collect_evals, job_source, load_json, select_checkpoint, step_of
from runner.registry.gate import chance_level, format_gate, gate, holder_evals
from runner.registry.gguf import check_gguf_tools, manifest_entries, parse_gguf_types
from runner.registry.store import (
    EXIT_REFUSED,
    FORMAT,
    MANIFEST,
    Registry,
    RegistryError,
    read_manifest,
    tree_files,
    validate_name,
)
from runner.runs import now_iso
from runner.serving_image import (
    ServeTemplate,
    build_serving_image,
    docker_client,
    serve_job_data,
    serving_base,
    tag_image,
)
from runner.spec.models import OFFLINE_BASE_MARKERS

if TYPE_CHECKING:
    from runner.runs import Run


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "config.json", "generation_config.json",
)


def git_info(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _find_adapter_dir(checkpoint: Path) -> Path | None:
    if (checkpoint / "adapter_config.json").is_file():
        return checkpoint
    for p in sorted(checkpoint.rglob("adapter_config.json")):
        if len(p.relative_to(checkpoint).parts) <= 3:
            return p.parent
    return None


def _finalise_files(tmp: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for rel in tree_files(tmp):
        if rel == MANIFEST:
            continue
        p = tmp / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    return files


def _workload(args: list[str], what: str) -> None:
    """Run `python -m runner.workloads.recipes.artifact ARGS` (torch lives there, not in this process)."""
    proc = subprocess.run([sys.executable, "-m", "runner.workloads.recipes.artifact", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RegistryError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), EXIT_REFUSED)


@dataclass
class Promotion:
    name: str
    version: int
    vdir: Path
    manifest: dict[str, Any]
    messages: list[str]
    warnings: list[str]


def promote(ref: str, to: str, *, checkpoint: str = "best", alias: str | None = None, image: bool = False,
            merge: bool = False, force: bool = False, home: Path | None = None, gguf: str | None = None,
            serve: Any | None = None, log: Callable[[str], None] | None = None) -> Promotion:
    """Copy a run's checkpoint into a new immutable version of `to`; optionally gate and move `alias`.
    `gguf` ("q8_0,q4_k_m") also stores GGUF files of the merged weights (implies `merge`).
    `serve` (a loaded serve job, with `image`) is what the serving image runs: its engine picks the image's base
    (vLLM's for engine vllm) and its settings are baked into the image's serve job.
    `log` receives progress text (waiting for the lock, image build output) as it happens."""
    from runner.runs import RunError, RunStore

    if "@" in to and ":" not in to:
        bare, _, wanted = to.partition("@")
        raise RegistryError(f"invalid --to {to!r}: --to takes a registry name; to move an alias write "
                            f"--to {bare} --alias {wanted}")
    name = validate_name(to)
    if alias is not None:
        validate_name(alias, "alias")
    gguf_types = parse_gguf_types(gguf) if gguf is not None else []
    converter = check_gguf_tools(gguf_types) if gguf_types else None  # before anything is written
    merge = merge or bool(gguf_types)
    if serve is not None and not image:
        raise RegistryError(f"--serve {serve.source} says what a serving image runs; add --image to build one")
    template = ServeTemplate(serve) if serve is not None else None
    try:
        run = RunStore(home).get(ref)
    except RunError as e:
        raise RegistryError(str(e)) from None
    ck = select_checkpoint(run, checkpoint)
    adapter_dir = _find_adapter_dir(ck)
    if adapter_dir is None:
        raise RegistryError(f"{ck} holds no PEFT adapter (adapter_config.json); is it a LoRA training checkpoint?",
                            EXIT_REFUSED)
    job_data = run.job_data()
    base = str((job_data.get("model") or {}).get("base", ""))
    if image and not merge and Path(base).is_absolute():
        raise RegistryError(
            f"the run's base model {base} is a directory on this machine, which a serving image would not have; "
            "add --merge (the image then carries full merged weights)")
    if image:
        serving_base({"image_flavour": job_data.get("image", "cpu")}, template)  # an engine with no image: refused
        docker_client()  # fail fast (exit 3) before copying or merging anything
    evals = collect_evals(run, ck, job_data)
    messages: list[str] = []
    if not evals and not force:
        raise RegistryError(
            f"no evaluation of {run.ref} {ck.name}: neither validation accuracy at that step in metrics.jsonl nor "
            f"an `eval` run on it. Produce one with: {eval_advice(run, ck)}or promote with --force "
            "(recorded in the manifest)", EXIT_REFUSED)
    reg = Registry(home)
    with reg.lock(name, log):
        gate_rec: dict[str, Any] | None = None
        if alias is not None:
            holder = reg.aliases(name).get(alias)
            if holder is None:
                gate_rec = {"alias": alias, "holder": None, "passed": True, "decision": "first holder"}
            else:
                hv = int(holder["version"])
                hdir = reg.version_dir(name, hv)
                held = holder_evals(hdir, read_manifest(hdir))
                try:
                    g = gate([e for e, _ in evals], held)
                except RegistryError as e:
                    if not force:
                        advice = shared_eval_advice(run, ck, [e for e, _ in evals], f"{name}:v{hv}", held)
                        raise RegistryError(f"{e}.\n{advice}\nor promote with --force (recorded in the manifest)",
                                            EXIT_REFUSED) from None
                    g = {"passed": False, "error": str(e)}
                g.update(alias=alias, holder=f"{name}:v{hv}")
                if "candidate_accuracy" in g:
                    messages += format_gate(g, f"{name}:v{hv}", alias)
                if not g["passed"] and not force:
                    raise RegistryError(
                        "\n".join(messages) + f"\nrefused: candidate accuracy {g['candidate_accuracy']:.4f} < "
                        f"{g['holder_accuracy']:.4f} of @{alias} ({name}:v{hv}); nothing was written. "
                        "Use --force to promote anyway (recorded in the manifest).", EXIT_REFUSED)
                g["decision"] = "accepted" if g["passed"] else "forced"
                gate_rec = g
        version = max(reg.versions(name), default=0) + 1
        if image and template is not None:
            serve_job_data(name, version, template)  # the image's serve job must fit this name: before any write
        warnings = _chance_warnings(evals, f"{name}:v{version}", alias, gate_rec)
        ndir = reg.name_dir(name)
        for stale in ndir.glob(".tmp-v*"):  # left by a promotion that died; we hold the lock, so it is not live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = ndir / f".tmp-v{version}"
        tmp.mkdir()
        try:
            manifest = _assemble(tmp, run, ck, checkpoint, adapter_dir, job_data, evals, name, version, merge,
                                 gguf_types)
            manifest["forced"] = bool(force)
            manifest["promotion"] = {"alias": alias, "gate": gate_rec, "forced": bool(force), "warnings": warnings}
            manifest["image"] = None
            manifest["files"] = _finalise_files(tmp)
            manifest["gguf"] = (manifest_entries(gguf_types, manifest["files"], converter, "merged")
                                if converter is not None else None)
            for rel in manifest["files"]:
                (tmp / rel).chmod(0o444)
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if image:
                # The image carries this manifest (its file list verifies the baked copy); the image id is added
                # to the registry's copy afterwards, since an image cannot contain its own id.
                manifest["image"] = build_serving_image(tmp, manifest, name, version, log, template)
                atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            (tmp / MANIFEST).chmod(0o444)
            fsync_dir(tmp)
            final = reg.version_dir(name, version)
            os.rename(tmp, final)
            fsync_dir(ndir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        reg.event(name, {"event": "promote", "version": version, "run": run.ref, "checkpoint": ck.name,
                         "forced": bool(force)})
        messages.append(f"promoted {run.ref} {ck.name} -> {name}:v{version} ({final})")
        if alias is not None:
            prev = reg.set_alias(name, alias, version, forced=bool(force))
            if image and manifest.get("image"):
                tag_image(manifest["image"]["id"], f"{name}:{alias}")
            was = f" (was v{prev['version']})" if prev else ""
            messages.append(f"alias {name}@{alias} -> v{version}{was}" + (" [forced]" if force else ""))
        return Promotion(name, version, final, manifest, messages, warnings)


def _chance_warnings(evals: list[tuple[Eval, Path | None]], label: str, alias: str | None,
                     gate_rec: dict[str, Any] | None) -> list[str]:
    """A warning when the evaluation a version is known by looks like guessing: a first holder sets the bar
    every later candidate is held to."""
    if not evals:
        return []
    ev = max((e for e, _ in evals), key=lambda e: (e.kind == "eval-run", e.n or 0))
    why = chance_level(ev)
    if not why:
        return []
    role = (f", the first holder of @{alias}," if gate_rec and gate_rec.get("decision") == "first holder"
            else f", the new holder of @{alias}," if alias else "")
    return [f"warning: {label}{role} is at chance level on {ev.eval_set} ({ev.kind}, {ev.source}): "
            + "; ".join(why) + ". It may not have learned the task; check its training run before relying on it."]


def _lora_of(adapter: Path) -> dict[str, Any] | None:
    """The adapter's real shape, from its adapter_config.json."""
    cfg = load_json(adapter / "adapter_config.json")
    if not isinstance(cfg, dict):
        return None
    targets = cfg.get("target_modules")
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "peft_type": cfg.get("peft_type"), "base_model_name_or_path": cfg.get("base_model_name_or_path")}


def _assemble(tmp: Path, run: Run, ck: Path, which: str, adapter_dir: Path, job_data: dict[str, Any],
              evals: list[tuple[Eval, Path | None]], name: str, version: int, merge: bool,
              gguf_types: list[str]) -> dict[str, Any]:
    for fn in ADAPTER_FILES + TOKENIZER_FILES:
        for src_dir in dict.fromkeys((adapter_dir, ck)):
            if (src_dir / fn).is_file() and not (tmp / "adapter" / fn).exists():
                _copy_file(src_dir / fn, tmp / "adapter" / fn)
    tok_dir = ck / "tokenizer"  # the trainer saves the tokenizer beside the adapter
    if tok_dir.is_dir():
        for f in sorted(tok_dir.iterdir()):
            if f.is_file():
                _copy_file(f, tmp / "tokenizer" / f.name)
    _copy_file(run.dir / "job.yaml", tmp / "source" / "job.yaml")
    if (ck / "trainer_state.json").is_file():
        _copy_file(ck / "trainer_state.json", tmp / "source" / "trainer_state.json")
    records = []
    for i, (ev, path) in enumerate(evals):
        if ev.correct:
            rel = f"eval/{i:02d}-{ev.kind}.json"
            if path is not None:
                _copy_file(path, tmp / rel)
            else:
                rows = [{"id": q, "correct": c} for q, c in sorted(ev.correct.items())]
                (tmp / "eval").mkdir(exist_ok=True)
                (tmp / rel).write_text(json.dumps({"predictions": rows}) + "\n")
            ev.predictions_file = rel
        records.append(ev.record())
    model = job_data.get("model") or {}
    base = str(model.get("base", "")) if isinstance(model, dict) else ""
    bundled = None
    if base in OFFLINE_BASE_MARKERS:
        # A named offline base exists only in this machine's cache: bundle it so the version (and its image) stands
        # alone, with no cache and no network.
        _workload(["bundle-base", str(run.dir / "job.yaml"), str(tmp / "base")], f"bundling the {base} base model")
        bundled = "base"
    if merge:
        _workload(["merge", str(tmp), str(tmp / "merged")], "merging the adapter into the base weights")
    if gguf_types:
        _workload(["gguf", str(tmp / "merged"), str(tmp / "gguf"), "--types", ",".join(gguf_types)],
                  f"converting the merged weights to GGUF ({', '.join(gguf_types)})")
    st = run.status()
    primary = max(records, key=lambda r: (r["kind"] == "eval-run", r["n"] or 0)) if records else None
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "created_at": now_iso(),
        "source": {
            "run": run.ref, "run_id": run.id, "job": run.job_name, "run_dir": str(run.dir),
            "run_state": st.get("state"), "kind": st.get("kind") or job_data.get("kind"),
            "spec_hash": job_data.get("spec_hash") or st.get("spec_hash"),
            "job_file": job_source(run), "resolved_spec": "source/job.yaml",
            "checkpoint": ck.name, "checkpoint_selector": which, "step": step_of(ck),
        },
        "base_model": {
            "base": base, "revision": model.get("revision") if isinstance(model, dict) else None,
            "bundled": bundled,
        },
        "lora": _lora_of(tmp / "adapter") or job_data.get("lora"),
        "image_flavour": job_data.get("image", "cpu"),
        "eval": primary,
        "evals": records,
        "merged": "merged" if merge else None,
        "git": git_info(),
    }
