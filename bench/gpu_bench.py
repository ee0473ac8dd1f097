"""GPU training benchmark: the project's training step against the best plain HF + PEFT loops a competent user
writes, in the same process, on the same samples and the same objective (loss on the answer token).

Random-init Qwen2.5 architectures (`model_shapes.py`; nothing is downloaded), bf16 on CUDA, LoRA r=16 on all seven
projections. Samples are MCQ-like (lognormal lengths around ~180 tokens, clipped to 48..1024, as
../shared/bench/hf_peft_baseline.py); each step is the samples that fill `--budget` tokens, the same steps for
every method. The methods are those of `train_bench.py`:

- `grouped_hf` (a): steps in HF's `LengthGroupedSampler` order, right-padded, 2D mask, answer-only logits;
- `packed4d_hf` (b): the step packed into one row, 4D block-diagonal mask, answer-only logits;
- `flattened_hf` (b): `DataCollatorWithFlattening`, position ids only (transformers masks the sequences);
- `padded_hf` (c, reference row): unsorted padded batches, full-vocabulary logits at every position;
- `ours`: `train.layout: auto` on this device (varlen attention over packed rows on CUDA where PyTorch has the
  kernel) with fused LoRA; `ours_grouped_compiled`: length-grouped rows with `train.compile`.

Prints real (non-pad) tokens/s, MFU = tokens/s x 4N / the GPU's dense bf16 spec peak (N = all parameters: forward
2N plus the activation gradients 2N; the frozen base has no weight gradients; attention FLOPs not counted; H100/H200
989 TFLOP/s, MI300X 1,307; the same formula as the trainer's `mfu` metric), peak memory, the first step's loss per
method, and `train_speedup_vs_best_hf_<size>` against the best of (a) and (b).

    python bench/gpu_bench.py --size tiny            # CPU smoke test of every method
    python bench/gpu_bench.py --size 0.5b,7b
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_bench as tb  # noqa: E402
from model_shapes import SIZES  # noqa: E402

from runner.workloads.model.compiled import compile_layers  # noqa: E402
from runner.workloads.model.fused_lora import fuse_lora  # noqa: E402
from runner.workloads.model.packed_attention import enable_packed_attention, varlen_available  # noqa: E402
from runner.workloads.training.packing import Example, resolve_layout  # noqa: E402
from runner.workloads.training.progress import PEAK_TFLOPS  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
HF_METHODS = ("grouped_hf", "packed4d_hf", "flattened_hf")


def emit(**kw: Any) -> dict[str, Any]:
    print(json.dumps(kw), flush=True)
    return kw


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_tflops() -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    if DEV != "cuda":
        return None
    name = torch.cuda.get_device_name().upper()
    return next((tf for key, tf in PEAK_TFLOPS.items() if key in name), None)


def build_base(size: str) -> tuple[Any, int]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        m = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE)
    return m, sum(p.numel() for p in m.parameters())


def make_steps(vocab: int, n_steps: int, budget: int, seed: int = 0) -> list[list[Example]]:
    g = torch.Generator().manual_seed(seed)
    steps: list[list[Example]] = []
    while len(steps) < n_steps:
        step: list[Example] = []
        used = 0
        while True:
            n = int(torch.exp(torch.randn((), generator=g) * 0.5 + 5.2).clamp(48, 1024))
            if used + n > budget:
                break
            step.append(Example(ids=torch.randint(1, vocab, (n,), generator=g).tolist(), label_start=n - 1))
            used += n
        steps.append(step)
    return steps


def grouped_order(steps: list[list[Example]]) -> list[list[Example]]:
    """The same samples as `steps`, re-cut into steps of the same sizes in HF's LengthGroupedSampler order."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    flat = [e for s in steps for e in s]
    per = max(1, round(len(flat) / len(steps)))
    order = list(LengthGroupedSampler(per, lengths=[len(e) for e in flat], generator=torch.Generator().manual_seed(0)))
    return [[flat[i] for i in order[j : j + per]] for j in range(0, len(flat), per)]


def run_method(name: str, base: Any, steps: list[list[Example]], warm: int, budget: int, n_params: int,
               peak: float | None) -> dict[str, Any]:
    layout = resolve_layout("auto", True, DEV) if name == "ours" else "grouped"
    model = copy.deepcopy(base)
    if name == "ours" and layout == "varlen" and not enable_packed_attention(model):
        layout = "grouped"
    model = tb.with_lora(model, copy_base=False)  # `model` is already this method's copy
    if name.startswith("ours"):
        fuse_lora(model)
    if name == "ours_grouped_compiled":
        compile_layers(model)
    pad = 0
    fns = {
        "grouped_hf": lambda m, s: tb.grouped_hf(m, s, pad),
        "packed4d_hf": lambda m, s: tb.packed4d_hf(m, s, pad),
        "flattened_hf": lambda m, s: tb.flattened_hf(m, s, pad),
        "padded_hf": lambda m, s: tb.padded_hf(m, s, pad),
        "ours": lambda m, s: tb.ours(m, s, pad, budget, layout),
        "ours_grouped_compiled": lambda m, s: tb.ours(m, s, pad, budget, "grouped"),
    }
    fn = fns[name]
    self_backward = name.startswith("ours")
    first = fn(model, steps[0])
    if not self_backward:
        first.backward()
    model.zero_grad(set_to_none=True)
    first_loss = first.item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, total = 0, 0.0
    for i, s in enumerate(steps[: warm] + steps):
        sync()
        t0 = time.perf_counter()
        loss = fn(model, s)
        if not self_backward:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warm:
            total += time.perf_counter() - t0
            tokens += sum(map(len, s))
    tps = tokens / total
    row = emit(bench="train", method=name, layout=layout if name.startswith("ours") else None,
               tokens_per_s=round(tps, 1), first_step_loss=round(first_loss, 5),
               mfu_4N=round(tps * 4 * n_params / (peak * 1e12), 4) if peak else None,
               max_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEV == "cuda" else None)
    del model, opt
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", help="comma list of tiny, 0.5b, 7b")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: tiny 3, else 8)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: tiny 1, else 3)")
    ap.add_argument("--budget", default=None, help="tokens per step, per size: e.g. 0.5b=16384,7b=8192")
    ap.add_argument("--methods", default="grouped_hf,packed4d_hf,flattened_hf,padded_hf,ours,ours_grouped_compiled")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    peak = peak_tflops()
    emit(bench="env", dev=DEV, gpu=torch.cuda.get_device_name() if DEV == "cuda" else None, torch=torch.__version__,
         transformers=transformers.__version__, peak_tflops=peak, varlen_attention=varlen_available(),
         flops_per_token="4N (N = all parameters)")
    budgets = {"tiny": 2048, "0.5b": 16384, "7b": 8192}
    for kv in (args.budget or "").split(","):
        if "=" in kv:
            k, v = kv.split("=")
            budgets[k] = int(v)
    for size in args.size.split(","):
        base, n_params = build_base(size)
        tiny = size == "tiny"
        steps = make_steps(SIZES[size]["vocab_size"], args.steps or (3 if tiny else 8), budgets[size])
        grouped = grouped_order(steps)
        rows = {}
        for name in args.methods.split(","):
            use = steps if name == "padded_hf" else grouped
            try:
                rows[name] = run_method(name, base, use, args.warmup if args.warmup is not None else (1 if tiny else 3),
                                        budgets[size], n_params, peak)
            except torch.OutOfMemoryError as e:
                emit(bench="train", method=name, size=size, error="OOM", detail=str(e)[:300])
                e.__traceback__ = None
                gc.collect()
                torch.cuda.empty_cache()
            except Exception as e:  # a kernel missing on this GPU/PyTorch: report it, keep measuring
                emit(bench="train", method=name, size=size, error=type(e).__name__, detail=str(e)[:400])
        hf = [n for n in HF_METHODS if n in rows]
        ours = [n for n in ("ours", "ours_grouped_compiled") if n in rows]
        if hf and ours:
            best_hf = max(hf, key=lambda n: rows[n]["tokens_per_s"])
            best = max(ours, key=lambda n: rows[n]["tokens_per_s"])
            losses = [r["first_step_loss"] for n, r in rows.items() if n != "padded_hf"]  # same first step
            emit(bench="summary", size=size, params=n_params, best_hf=best_hf, best_ours=best,
                 ours_tokens_per_s=rows[best]["tokens_per_s"], ours_mfu_4N=rows[best]["mfu_4N"],
                 best_hf_tokens_per_s=rows[best_hf]["tokens_per_s"], loss_spread=round(max(losses) - min(losses), 5))
            print(f"train_speedup_vs_best_hf_{size}: {rows[best]['tokens_per_s'] / rows[best_hf]['tokens_per_s']:.2f}",
                  flush=True)
        del base
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
