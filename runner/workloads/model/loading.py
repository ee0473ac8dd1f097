"""Model and tokenizer loading: a Hugging Face id, a local directory, or a named offline base (`tiny`,
`smollm2-135m`); LoRA via PEFT.

Loading imports no training, data or scoring code. A named offline base that is not in the cache yet is built by
its builder (a recipe, or a model module that imports none of those), found by module name in `OFFLINE_BASES`
and imported only then.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from runner.paths import runner_cache
from runner.spec.models import LoraSpec, ModelSpec
from runner.workloads.model.tiny import is_built, tiny_dir

# Named offline bases -> the module whose `build(model_spec, cache_dir, log)` makes one (or finds it cached).
OFFLINE_BASES = {
    "tiny": "runner.workloads.recipes.pretrain_tiny",
    "smollm2-135m": "runner.workloads.model.smollm2",
}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    dev = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if dev.type in ("cuda", "xpu") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# --- loading -------------------------------------------------------------------------------------------


def base_model_path(model_spec: ModelSpec, cache_dir: Path | None = None, log: Any = print) -> str:
    """Where the base weights come from: an offline base's cache directory, a local directory, or a Hub id."""
    if model_spec.base == "tiny":
        path = tiny_dir(model_spec.tiny, cache_dir)
        if not is_built(path):
            path = importlib.import_module(OFFLINE_BASES["tiny"]).build(model_spec, cache_dir, log)
        return str(path)
    if model_spec.base in OFFLINE_BASES:
        return str(importlib.import_module(OFFLINE_BASES[model_spec.base]).build(model_spec, cache_dir, log))
    return model_spec.base


def load_model_and_tokenizer(
    model_spec: ModelSpec, device: torch.device | str = "cpu", cache_dir: Path | None = None, log: Any = print
) -> tuple[Any, Any]:
    """Base model (eval mode, on `device`) and its tokenizer; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_model_path(model_spec, cache_dir, log)
    local = Path(path).is_dir()
    if not local and model_spec.base != "tiny" and ("/" not in path or path.startswith((".", "/"))):
        raise FileNotFoundError(f"model.base {path!r}: no such directory, and it does not look like a Hub id")
    kw: dict[str, Any] = {}
    if model_spec.revision and not local:
        kw["revision"] = model_spec.revision
    hf_cache = None if local else str((cache_dir or runner_cache()) / "hf")
    tok = AutoTokenizer.from_pretrained(path, cache_dir=hf_cache, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = resolve_dtype(model_spec.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=model_spec.attn_implementation, cache_dir=hf_cache, **kw
    )
    model.to(device)
    model.eval()
    if model_spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tok


def attach_lora(model: Any, lora: LoraSpec) -> Any:
    """Wrap the base in a PEFT LoRA model; only the adapter's weights require grad."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def load_adapter(model: Any, adapter_dir: Path, trainable: bool = True) -> Any:
    """Base model + a saved adapter (a checkpoint's `adapter/`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def count_params(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable

