"""GPU training benchmark: the project's trainer step vs the shared plain HF + PEFT baseline, same process.

Our step is what runner.workloads.recipes.train runs: samples packed into rows with a block-diagonal causal mask
(no attention across samples), position ids restarting per sample, LoRA r=16 on all seven projections,
and the cross-entropy only at the answer positions (the lm_head runs on those hidden states only).
Random-init Qwen2.5 architectures (nothing is downloaded), bf16 on CUDA; real (non-pad) tokens/s, MFU at
4N FLOPs/token against PEAK_TFLOPS (default 790, the baseline's), peak memory. Also runs on CPU:

    python bench/gpu_bench.py --size tiny                      # CPU smoke test
    python bench/gpu_bench.py --size 0.5b,7b --baseline ../shared/bench/hf_peft_baseline.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from model_shapes import SIZES  # noqa: E402  (bench/ is on sys.path when run as a script)

from runner.workloads.model.packed_attention import enable_packed_attention, varlen_available
from runner.workloads.training.packing import Example, answer_loss_sum, collate_packed, pack_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32


def emit(**kw: Any) -> dict[str, Any]:
    print(json.dumps(kw), flush=True)
    return kw


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def build(size: str, gradient_checkpointing: bool = False, varlen: bool = False) -> tuple[torch.nn.Module, int]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    with torch.device(DEV):
        m = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE)
    n = sum(p.numel() for p in m.parameters())
    if varlen and not enable_packed_attention(m):
        raise RuntimeError("packed attention could not be enabled")
    if gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(m, lcfg), n


def sample_stream(vocab: int, seed: int = 0, max_len: int = 1024) -> Any:
    """MCQ-like samples forever: lognormal lengths around ~180 tokens (as the baseline), one answer token."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for n in torch.exp(torch.randn(256, generator=g) * 0.5 + 5.2).clamp(48, min(1024, max_len)).long().tolist():
            yield Example(ids=torch.randint(0, vocab, (n,), generator=g).tolist(), label_start=n - 1)


def next_rows(stream: Any, rows: int, row_len: int, carry: list[Example]) -> list[list[Example]]:
    exs = list(carry)
    carry.clear()
    while True:
        exs.append(next(stream))
        packed = pack_rows([len(e) for e in exs], row_len)
        if len(packed) > rows:
            carry.append(exs.pop())
            packed = pack_rows([len(e) for e in exs], row_len)
            return [[exs[i] for i in r] for r in packed]


def ours(size: str, rows: int, row_len: int, steps: int, warm: int, peak: float, gc: bool = False,
         varlen: bool = False) -> dict[str, Any]:
    model, n_params = build(size, gc, varlen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stream = sample_stream(SIZES[size]["vocab_size"], max_len=row_len)
    carry: list[Example] = []
    tokens = 0
    total = 0.0
    for step in range(warm + steps):
        batch = collate_packed(next_rows(stream, rows, row_len, carry), 0, DTYPE, row_len, mask=not varlen).to(DEV)
        sync()
        t0 = time.perf_counter()
        loss = answer_loss_sum(model, batch) / len(batch.targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= warm:
            total += time.perf_counter() - t0
            tokens += batch.n_tokens
    tps = tokens / total
    row = emit(bench="train", who="ours", attention="varlen" if varlen else "4d-mask", size=size,
               layout=f"{rows}x{row_len}", gradient_checkpointing=gc,
               params=n_params, tokens_per_s=round(tps, 1),
               mfu_4N=round(tps * 4 * n_params / peak, 4) if DEV == "cuda" else None,
               max_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None)
    del model, opt
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def check_exact(size: str = "tiny", varlen: bool = False) -> float:
    """Our packed answer-only loss equals the per-sample loss of the samples run alone (max abs diff)."""
    model, _ = build(size, varlen=varlen)
    model.eval()
    stream = sample_stream(SIZES[size]["vocab_size"], seed=1)
    exs = [next(stream) for _ in range(4)]
    with torch.no_grad():
        packed = collate_packed([exs[:2], exs[2:]], 0, DTYPE, mask=not varlen).to(DEV)
        a = answer_loss_sum(model, packed).float()
        b = sum(answer_loss_sum(model, collate_packed([[e]], 0, DTYPE).to(DEV)).float() for e in exs)
    return float((a - b).abs())


def load_baseline(path: str | None) -> Any:
    here = Path(__file__).resolve().parent
    candidates = [path] if path else [here.parents[1] / "shared/bench/hf_peft_baseline.py",
                                      here.parent / "shared/bench/hf_peft_baseline.py",
                                      Path("/work/shared/bench/hf_peft_baseline.py")]
    for c in candidates:
        if c and Path(c).exists():
            spec = importlib.util.spec_from_file_location("hf_peft_baseline", str(c))
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    return None


def baseline(mod: Any, size: str, mode: str, bsz: int, steps: int, warm: int, row_len: int = 4096) -> dict | None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            mod.train_bench(size, mode, steps, warm, bsz, row_len=row_len)
        except torch.OutOfMemoryError:
            print(json.dumps({"bench": "train", "size": size, "mode": mode, "error": "OOM"}))
    out = None
    for ln in buf.getvalue().splitlines():
        d = json.loads(ln)
        d["who"] = "hf_peft_baseline"
        print(json.dumps(d), flush=True)
        out = d
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", help="comma list of tiny, 0.5b, 7b")
    ap.add_argument("--layouts", default=None, help="packed rows x row length, comma list (default 8x1024,2x4096)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--baseline", default=None, help="path to hf_peft_baseline.py (default: ../shared/bench/)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-varlen", action="store_true", help="skip the variable-length attention runs")
    args = ap.parse_args()
    peak = float(os.environ.get("PEAK_TFLOPS", "790")) * 1e12
    emit(bench="env", dev=DEV, gpu=torch.cuda.get_device_name() if DEV == "cuda" else None, torch=torch.__version__,
         transformers=__import__("transformers").__version__, peak_tflops=peak / 1e12)
    varlen = DEV == "cuda" and varlen_available() and not args.no_varlen
    emit(bench="exactness", size="tiny", attention="4d-mask", packed_vs_alone_abs_diff=check_exact())
    if varlen or DEV == "cpu":  # on a CPU the mask-free path runs one SDPA per sample (checks the plumbing)
        emit(bench="exactness", size="tiny", attention="varlen" if varlen else "per-sample-sdpa",
             packed_vs_alone_abs_diff=check_exact(varlen=True))
    mod = None if args.no_baseline else load_baseline(args.baseline)
    if mod is None and not args.no_baseline:
        emit(bench="warning", message="baseline not found; pass --baseline PATH")
    for size in args.size.split(","):
        tiny = size == "tiny"
        steps = args.steps or (3 if tiny else 8)
        warm = args.warmup if args.warmup is not None else (1 if tiny else 3)
        layouts = args.layouts or ("2x512" if tiny else "8x1024,2x4096" if size == "7b" else "16x1024,4x4096")
        results = []
        for lay in layouts.split(","):
            r, L = (int(x) for x in lay.split("x"))
            for vl in ([False, True] if varlen else [False]):
                try:
                    results.append(ours(size, r, L, steps, warm, peak, args.gradient_checkpointing, vl))
                except torch.OutOfMemoryError as e:
                    emit(bench="train", who="ours", size=size, layout=lay, varlen=vl, error="OOM", detail=str(e)[:400])
                    e.__traceback__ = None
                    torch.cuda.empty_cache()
                except Exception as e:  # a kernel missing on this GPU/PyTorch: report it, keep measuring
                    emit(bench="train", who="ours", size=size, layout=lay, varlen=vl, error=type(e).__name__,
                         detail=str(e)[:400])
        best = max(results, key=lambda d: d["tokens_per_s"]) if results else None
        base = None
        if mod is not None:
            bsz = 8 if tiny else (16 if size == "0.5b" else 8)
            base = baseline(mod, size, "padded", bsz, steps, warm)
        if best and base and "tokens_per_s" in base:
            emit(bench="summary", size=size, best_layout=best["layout"], best_attention=best["attention"],
                 ours_tokens_per_s=best["tokens_per_s"],
                 ours_mfu_4N=best["mfu_4N"], padded_baseline_tokens_per_s=base["tokens_per_s"],
                 speedup_vs_padded=round(best["tokens_per_s"] / base["tokens_per_s"], 2))


if __name__ == "__main__":
    main()
