"""Measure peak GPU memory of LoRA training steps and compare it with preflight's estimate (needs a GPU).

    python tests/measure_memory.py [OUT.jsonl]

Random-initialised models of the built-in shapes (nothing is downloaded), LoRA on all seven projections, AdamW,
bf16, SDPA, loss on every token; peak = torch.cuda.max_memory_allocated over two optimizer steps.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

from runner.preflight.memory import GiB, Setup, allocated, estimate
from runner.preflight.shapes import KNOWN

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (model, rows, row length, gradient checkpointing, LoRA r, LoRA dropout)
CASES = [
    ("qwen2.5-0.5b", 4, 4096, False, 16, 0.0),
    ("qwen2.5-7b", 2, 4096, False, 16, 0.0),
    ("qwen2.5-7b", 4, 4096, True, 16, 0.0),
    ("qwen2.5-7b", 4, 2048, True, 64, 0.05),
    ("qwen3-8b", 2, 2048, False, 16, 0.0),
    ("llama-3.2-1b", 8, 1024, False, 16, 0.0),
]


def config(key: str):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    a = KNOWN[key]
    kw = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
              num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
              tie_word_embeddings=a.tied, max_position_embeddings=32768)
    if key.startswith("qwen2.5"):
        return Qwen2Config(**kw)
    if key.startswith("qwen3"):
        return Qwen3Config(head_dim=a.hd, **kw)
    return LlamaConfig(**kw)


def measure(key: str, rows: int, length: int, gc_on: bool, r: int, dropout: float) -> dict[str, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config(key), dtype=torch.bfloat16, attn_implementation="sdpa")
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(ALL)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, KNOWN[key].vocab, (rows, length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GiB
    est = allocated(estimate(KNOWN[key], Setup("bf16", rows * length, gc_on, r, ALL, dropout, 1))) / GiB
    del model, opt, loss, ids
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": key, "rows": rows, "length": length, "gradient_checkpointing": gc_on, "r": r,
            "dropout": dropout, "peak_gib": round(peak, 2), "estimate_gib": round(est, 2),
            "ratio": round(est / peak, 3), "seconds": round(time.time() - t0, 1)}


def main() -> int:
    out = open(sys.argv[1], "a") if len(sys.argv) > 1 else None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for case in CASES:
        try:
            res = measure(*case)
        except torch.OutOfMemoryError as e:
            res = {"case": case, "error": f"out of memory: {str(e)[:200]}"}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(res), flush=True)
        if out:
            out.write(json.dumps(res) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
