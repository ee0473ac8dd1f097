"""Merged weights to GGUF files with llama.cpp's own tools: `convert_hf_to_gguf.py` (a subprocess, argv list, its
gguf-py first on the path) writes f32/f16/bf16/q8_0; llama.cpp's quantiser (`llama_model_quantize` through
llama-cpp-python) makes the other types from the converter's f16/bf16/f32 output."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner.registry import RegistryError
from runner.registry.gguf import CONVERTER_TYPES, find_converter, intermediate_type

GGUF_MAGIC = b"GGUF"
CONVERT_TIMEOUT_S = 6 * 3600


def convert(merged: Path, out: Path, outtype: str, converter_root: Path, log: Any = print) -> None:
    """One converter run: `merged` (a Hugging Face model directory) -> `out` of `outtype`."""
    conv = converter_root / "convert_hf_to_gguf.py"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join([str(converter_root / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    argv = [sys.executable, str(conv), str(merged), "--outfile", str(out), "--outtype", outtype]
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n  ".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise RegistryError(f"llama.cpp's convert_hf_to_gguf.py failed on {merged} (--outtype {outtype}, exit "
                            f"{proc.returncode}):\n  {tail}")
    check_magic(out)
    log(f"gguf: {out.name} written by convert_hf_to_gguf.py in {time.monotonic() - t0:.1f} s "
        f"({out.stat().st_size / 1e6:.1f} MB)")


def quantize(src: Path, out: Path, gguf_type: str, log: Any = print) -> None:
    """llama.cpp's quantiser: `src` (f32/f16/bf16 GGUF) -> `out` of `gguf_type` (q4_k_m, q5_0, ...)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise RegistryError(f"quantising to {gguf_type} needs llama-cpp-python ({e}); run `bash .ci/llamacpp-up.sh`") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if ftype is None:
        raise RegistryError(f"llama-cpp-python {llama_cpp.__version__} has no quantisation type {gguf_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    t0 = time.monotonic()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise RegistryError(f"llama.cpp's quantiser failed on {src.name} -> {gguf_type} (return code {rc})")
    check_magic(out)
    log(f"gguf: {out.name} quantised from {src.name} in {time.monotonic() - t0:.1f} s "
        f"({out.stat().st_size / 1e6:.1f} MB)")


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise RegistryError(f"{path} is not a GGUF file (starts with {head!r})")


def write_ggufs(merged: Path, out: Path, types: list[str], log: Any = print) -> None:
    """`out/<type>.gguf` for each type, from the merged weights in `merged`. Written into `out.partial` and
    renamed, so `out` exists only when every file is complete."""
    if not (merged / "config.json").is_file():
        raise RegistryError(f"{merged} holds no merged model (config.json); the adapter must be merged first")
    conv = find_converter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for t in types:
            if t in CONVERTER_TYPES:
                convert(merged, tmp / f"{t}.gguf", t, conv.root, log)
        src = intermediate_type(types)
        if src is not None:
            src_path = tmp / f"{src}.gguf"
            scratch = not src_path.is_file()
            if scratch:
                src_path = tmp / f".{src}.scratch.gguf"  # removed before the rename: not part of the version
                convert(merged, src_path, src, conv.root, log)
            try:
                for t in types:
                    if t not in CONVERTER_TYPES:
                        quantize(src_path, tmp / f"{t}.gguf", t, log)
            finally:
                if scratch:
                    src_path.unlink(missing_ok=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
