"""GGUF files in a registry version (`runner promote --gguf q8_0,q4_k_m`): which types can be made, where llama.cpp's
converter is, the manifest entries, and the GGUF of a version for the `llamacpp` engine. No torch here: the
conversion itself runs `python -m runner.workloads.recipes.artifact gguf` (runner/workloads/model/gguf.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.paths import PROJECT_ROOT
from runner.registry.store import EXIT_ENV, EXIT_INVALID, RegistryError
from runner.spec.engines import GGUF_TYPES

GGUF_DIR = "gguf"
# Types llama.cpp's converter writes itself; every other type is quantised from one of these by llama.cpp's own
# quantiser (llama_model_quantize, through llama-cpp-python).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
SETUP_HINT = "run `bash .ci/llamacpp-up.sh` (it builds llama-cpp-python and installs llama.cpp's converter)"
CONVERTER_ENV = "QA_LLAMA_CPP_DIR"


def parse_gguf_types(value: str) -> list[str]:
    """`q8_0,q4_k_m` -> ["q8_0", "q4_k_m"]: known types, in the order given, once each."""
    out: list[str] = []
    for raw in value.split(","):
        t = raw.strip().lower()
        if not t:
            continue
        if t not in GGUF_TYPES:
            raise RegistryError(f"--gguf {value!r}: {raw.strip()!r} is not a GGUF type this runner makes; "
                                f"use one or more of {', '.join(GGUF_TYPES)}, comma-separated (e.g. --gguf q8_0,q4_k_m)",
                                EXIT_INVALID)
        if t not in out:
            out.append(t)
    if not out:
        raise RegistryError(f"--gguf {value!r} names no type; e.g. --gguf q8_0 or --gguf q8_0,q4_k_m", EXIT_INVALID)
    return out


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter as installed by .ci/llamacpp-up.sh: the script, its gguf-py, and what version."""

    root: Path
    version: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"


def converter_candidates() -> list[Path]:
    env = os.environ.get(CONVERTER_ENV)
    if env:
        return [Path(env)]
    return list(dict.fromkeys([Path(sys.prefix) / "share" / "llama.cpp", PROJECT_ROOT / ".venv" / "share" / "llama.cpp"]))


def find_converter() -> Converter:
    """The converter, or RegistryError (exit 3) saying where it was looked for and how to install it."""
    looked = converter_candidates()
    for root in looked:
        if (root / "convert_hf_to_gguf.py").is_file() and (root / "gguf-py" / "gguf").is_dir():
            if not (root / "conversion").is_dir():
                raise RegistryError(f"{root} has convert_hf_to_gguf.py but not its `conversion` package beside it; "
                                    f"{SETUP_HINT}", EXIT_ENV)
            try:
                version = (root / "VERSION").read_text().strip()
            except OSError:
                version = "unknown"
            return Converter(root.resolve(), version or "unknown")
    where = ", ".join(str(p) for p in looked)
    raise RegistryError(f"--gguf needs llama.cpp's convert_hf_to_gguf.py and gguf-py, found in none of: {where}; "
                        f"{SETUP_HINT}, or set {CONVERTER_ENV} to a llama.cpp checkout", EXIT_ENV)


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, without importing it (None: not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_gguf_tools(types: list[str]) -> Converter:
    """Everything `--gguf TYPES` needs, checked before a version is started: the converter, the Python packages it
    imports, and llama.cpp's quantiser for the types the converter does not write itself."""
    conv = find_converter()
    missing = [m for m in ("sentencepiece", "safetensors", "transformers", "torch", "numpy")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise RegistryError(f"llama.cpp's converter imports {', '.join(missing)}, not installed in {sys.executable}'s "
                            f"environment; {SETUP_HINT}", EXIT_ENV)
    quantised = [t for t in types if t not in CONVERTER_TYPES]
    if quantised and llama_cpp_version() is None:
        raise RegistryError(f"--gguf {','.join(quantised)} is quantised by llama.cpp's quantiser, from llama-cpp-python, "
                            f"which is not installed in {sys.executable}'s environment; {SETUP_HINT} "
                            f"(or ask only for {', '.join(CONVERTER_TYPES)}, which the converter writes itself)", EXIT_ENV)
    return conv


def intermediate_type(types: list[str]) -> str | None:
    """The converter's output that quantised types are made from: a requested f32/bf16/f16 when there is one
    (kept in the version), else f16 written as a scratch file (None: nothing to quantise)."""
    if all(t in CONVERTER_TYPES for t in types):
        return None
    return next((t for t in ("f32", "bf16", "f16") if t in types), "f16")


def gguf_rel(t: str) -> str:
    return f"{GGUF_DIR}/{t}.gguf"


def manifest_entries(types: list[str], files: dict[str, dict[str, Any]], conv: Converter,
                     merged: str) -> dict[str, dict[str, Any]]:
    """The manifest's `gguf` section: per type its path, size, how it was made and from which weights (the merged
    safetensors of this version, by sha256). Every GGUF is also in `files`, so `registry verify` re-hashes it."""
    weights = {rel: meta["sha256"] for rel, meta in sorted(files.items())
               if rel.startswith(f"{merged}/") and rel.endswith(".safetensors")}
    src = intermediate_type(types)
    quantiser = f"llama.cpp llama_model_quantize (llama-cpp-python {llama_cpp_version()})"
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        rel = gguf_rel(t)
        if rel not in files:
            raise RegistryError(f"the GGUF conversion wrote no {rel}")
        direct = t in CONVERTER_TYPES
        out[t] = {
            "path": rel, "type": t, "size": files[rel]["size"], "sha256": files[rel]["sha256"],
            "converter": f"convert_hf_to_gguf.py ({conv.version})",
            "quantiser": None if direct else quantiser, "quantised_from": None if direct else src,
            "source_weights": {"dir": merged, "sha256": weights},
        }
    return out


def gguf_file(version_dir: Path, manifest: dict[str, Any], gguf: str) -> Path:
    """The GGUF file of type `gguf` in a version (or `gguf` itself when it is a path to a .gguf file), or a
    RegistryError that names the types the version has and how to get another. The version's files are verified
    by whoever resolved it (resolve_artifact); this checks the entry is a file inside the version."""
    label = f"{manifest.get('name', version_dir.name)}:v{manifest.get('version', '?')}"
    if gguf.endswith(".gguf"):
        p = Path(gguf)
        if not p.is_file():
            raise RegistryError(f"gguf {gguf}: no such file; give a GGUF type of {label} "
                                f"({_have(manifest)}) or the path of an existing .gguf file")
        return p
    entries = manifest.get("gguf") or {}
    entry = entries.get(gguf) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        run = (manifest.get("source") or {}).get("run") or "RUN"
        raise RegistryError(
            f"{label} has no {gguf} GGUF ({_have(manifest)}); versions are immutable, so promote its run again "
            f"with the type you need: runner promote {run} --to {manifest.get('name', 'NAME')} "
            f"--checkpoint {(manifest.get('source') or {}).get('checkpoint') or 'best'} --gguf {gguf}")
    rel = str(entry.get("path", ""))
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts or rel not in (manifest.get("files") or {}):
        raise RegistryError(f"{label}: its manifest's gguf entry for {gguf} names {rel!r}, not a file of the version; "
                            "the version cannot be trusted: promote the checkpoint again")
    p = version_dir / rel
    if not p.is_file():
        raise RegistryError(f"{label}: {rel} is missing from {version_dir}; promote the checkpoint again")
    return p


def _have(manifest: dict[str, Any]) -> str:
    entries = manifest.get("gguf") or {}
    types = sorted(entries) if isinstance(entries, dict) else []
    return f"it has {', '.join(types)}" if types else "it has no GGUF files: it was promoted without --gguf"
