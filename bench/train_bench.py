"""CPU training benchmark: the project's training step against the best plain HF + PEFT loops a competent user
writes, in the same process, on the same model, the same samples and the same objective (loss on the answer token).

Samples are real MMLU val questions (`../shared/data/mmlu/val`), tokenised as the trainer does (the `mmlu` prompt
for the real model, `plain` for tiny). Every method trains the same LoRA (r=16 on all projections, fp32) from the
same initial weights, one optimizer step per step of 8 samples; the steps are the same samples for every method
except the reference row. Methods:

- `grouped_hf` (a): the steps come from HF's own `LengthGroupedSampler` order (`group_by_length`), right-padded
  with a 2D attention mask; logits only at the answer positions (decoder hidden states, gathered, then lm_head).
- `packed4d_hf` (b): the step's samples packed into one row with restarting position ids and a 4D block-diagonal
  mask, answer-only logits.
- `flattened_hf` (b): `DataCollatorWithFlattening` (one row, restarting position ids, no mask: transformers finds
  the sequences from the position ids and masks them), answer-only logits. On CUDA this is where flash/varlen
  attention would come in; on a CPU transformers builds the block mask itself.
- `padded_hf` (c, reference row only): today's plain loop, unsorted padded batches, `model(**batch, labels=...)`
  with full-vocabulary logits at every position.
- `ours`: the trainer's step as `train.layout: auto` picks it on this device (length-grouped rows, causal attention
  without a mask) with fused LoRA (the default); `ours_compiled`: the same with `train.compile: true`.

Every ratio is against the best of (a) and (b): `train_speedup_vs_best_hf` (with `train.compile`) and
`train_speedup_vs_best_hf_default` (the default options). The first step's loss of every method is printed with the
largest difference from the reference. Methods run round-robin; each one's time is its fastest round.

    python bench/train_bench.py [--models tiny,smollm2-135m] [--samples 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.workloads.training.packing import (  # noqa: E402
    Example,
    answer_loss_sum,
    collate_grouped,
    collate_packed,
    group_by_length,
    pack_rows,
    resolve_layout,
)

MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu" / "val"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP = 8  # samples per optimizer step


def load(base: str, n: int, max_len: int) -> tuple[Any, Any, list[Example]]:
    """The base model, its tokenizer and `n` MMLU val samples tokenised as the trainer tokenises them."""
    from runner.paths import runner_cache
    from runner.spec.models import DataSource, ModelSpec, PromptSpec, TinyModel
    from runner.workloads.data.sets import load_sources
    from runner.workloads.scoring.prompts import PromptStyle
    from runner.workloads.training.packing import encode_mcq

    recs = load_sources([DataSource(path=str(MMLU), format="mmlu_csv")], seed=0)
    recs = [recs[i] for i in torch.randperm(len(recs), generator=torch.Generator().manual_seed(0))[:n].tolist()]
    if base == "tiny":  # throughput only: the tiny architecture, untrained (no pretraining needed for a timing)
        from runner.workloads.model.tiny import build_tiny_model
        from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        model = build_tiny_model(TinyModel(), len(tok), tok.pad_token_id)
        style = PromptStyle.of(PromptSpec(style="plain"))
    else:
        from runner.workloads.model.loading import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(ModelSpec(base=base), "cpu", runner_cache(), lambda m: None)
        style = PromptStyle.of(PromptSpec(style="mmlu"))
    return model, tok, [encode_mcq(tok, r, max_len, prompt_style=style) for r in recs]


def with_lora(base: Any, copy_base: bool = True) -> Any:
    """LoRA r=16 on all projections, seeded, on a copy of `base` (or on `base` itself)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    m = get_peft_model(copy.deepcopy(base) if copy_base else base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=TARGETS, task_type="CAUSAL_LM"))
    m.train()
    return m


# --- the plain HF + PEFT steps ---------------------------------------------------------------------------

def _answer_positions(exs: list[Example]) -> list[int]:
    return [e.label_start - 1 for e in exs]


def _hidden_loss(model: Any, ids: torch.Tensor, where: torch.Tensor, targets: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Answer-only logits as a user writes them: the decoder's hidden states, gathered, through lm_head."""
    dev = next(model.parameters()).device
    kw = {k: v.to(dev) for k, v in kw.items()}
    if "attention_mask" in kw and kw["attention_mask"].is_floating_point():
        kw["attention_mask"] = kw["attention_mask"].to(next(model.parameters()).dtype)
    hidden = model.get_base_model().model(input_ids=ids.to(dev), use_cache=False, **kw).last_hidden_state
    logits = model.get_base_model().lm_head(hidden.reshape(-1, hidden.shape[-1])[where.to(dev)])
    return F.cross_entropy(logits.float(), targets.to(dev))


def grouped_hf(model: Any, exs: list[Example], pad: int) -> torch.Tensor:
    T = max(map(len, exs))
    ids = torch.full((len(exs), T), pad, dtype=torch.long)
    att = torch.zeros((len(exs), T), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e)] = torch.tensor(e.ids)
        att[i, : len(e)] = 1
    where = torch.tensor([i * T + p for i, p in enumerate(_answer_positions(exs))])
    targets = torch.tensor([e.ids[e.label_start] for e in exs])
    return _hidden_loss(model, ids, where, targets, attention_mask=att)


def _flat(exs: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([t for e in exs for t in e.ids])[None]
    pos = torch.cat([torch.arange(len(e)) for e in exs])[None]
    starts = torch.tensor([0] + [len(e) for e in exs]).cumsum(0)[:-1]
    where = starts + torch.tensor(_answer_positions(exs))
    targets = torch.tensor([e.ids[e.label_start] for e in exs])
    return ids, pos, where, targets


def packed4d_hf(model: Any, exs: list[Example], pad: int) -> torch.Tensor:
    ids, pos, where, targets = _flat(exs)
    seg = torch.cat([torch.full((len(e),), i) for i, e in enumerate(exs)])
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, len(seg), len(seg)).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return _hidden_loss(model, ids, where, targets, attention_mask=mask, position_ids=pos)


def flattened_hf(model: Any, exs: list[Example], pad: int) -> torch.Tensor:
    from transformers import DataCollatorWithFlattening

    feats = [{"input_ids": e.ids, "labels": [-100] * e.label_start + e.ids[e.label_start:]} for e in exs]
    batch = DataCollatorWithFlattening(return_position_ids=True)(feats, return_tensors="pt")
    _, _, where, targets = _flat(exs)
    return _hidden_loss(model, batch["input_ids"], where, targets, position_ids=batch["position_ids"])


def padded_hf(model: Any, exs: list[Example], pad: int) -> torch.Tensor:
    T = max(map(len, exs))
    ids = torch.full((len(exs), T), pad, dtype=torch.long)
    att = torch.zeros((len(exs), T), dtype=torch.long)
    labels = torch.full((len(exs), T), -100, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e)] = torch.tensor(e.ids)
        att[i, : len(e)] = 1
        labels[i, e.label_start : len(e)] = ids[i, e.label_start : len(e)]
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), attention_mask=att.to(dev), labels=labels.to(dev)).loss


# --- the project's step ------------------------------------------------------------------------------------

def ours(model: Any, exs: list[Example], pad: int, budget: int, layout: str = "grouped") -> torch.Tensor:
    """The trainer's step body (recipes/train.py): `grouped`, the step's samples by length into micro-batches of
    at most `budget` padded tokens; `varlen`, packed rows of `budget` tokens with per-sample attention (the model
    prepared with `enable_packed_attention`). The summed answer loss over the step's answer tokens."""
    dev = next(model.parameters()).device
    n = sum(len(e) - e.label_start for e in exs)
    total = torch.zeros((), device=dev)
    if layout == "varlen":
        dtype = next(model.parameters()).dtype
        rows = [[exs[i] for i in r] for r in pack_rows([len(e) for e in exs], budget)]
        batches = [collate_packed(rows, pad, dtype, mask=False)]
    else:
        batches = [collate_grouped(group, pad) for group in group_by_length(exs, budget)]
    for b in batches:
        loss = answer_loss_sum(model, b.to(dev)) / n
        loss.backward()
        total += loss.detach()
    return total


def bench_model(base_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from runner.workloads.model.compiled import compile_layers
    from runner.workloads.model.fused_lora import fuse_lora

    base, tok, exs = load(base_name, args.samples, args.max_len)
    pad = tok.pad_token_id
    budget = args.budget  # padded tokens per micro-batch in the grouped layout (the trainer's batch_size x max_seq_len)
    layout = resolve_layout("auto", True, "cpu")
    assert layout == "grouped", layout
    from transformers.trainer_pt_utils import LengthGroupedSampler

    order = list(LengthGroupedSampler(STEP, lengths=[len(e) for e in exs],
                                      generator=torch.Generator().manual_seed(0)))
    grouped_steps = [[exs[i] for i in order[j : j + STEP]] for j in range(0, len(exs), STEP)]
    plain_steps = [exs[j : j + STEP] for j in range(0, len(exs), STEP)]
    real = sum(map(len, exs))
    StepFn = Callable[[Any, list[Example]], torch.Tensor]
    methods: dict[str, tuple[StepFn, list[list[Example]], bool]] = {  # name: (loss of a step, steps, calls backward)
        "grouped_hf": (lambda m, s: grouped_hf(m, s, pad), grouped_steps, False),
        "packed4d_hf": (lambda m, s: packed4d_hf(m, s, pad), grouped_steps, False),
        "flattened_hf": (lambda m, s: flattened_hf(m, s, pad), grouped_steps, False),
        "padded_hf": (lambda m, s: padded_hf(m, s, pad), plain_steps, False),
        "ours": (lambda m, s: ours(m, s, pad, budget), grouped_steps, True),
        "ours_compiled": (lambda m, s: ours(m, s, pad, budget), grouped_steps, True),
    }
    models = {}
    setup_s = {}
    for name in methods:
        t = time.perf_counter()
        models[name] = with_lora(base)
        if name.startswith("ours"):
            fuse_lora(models[name])
        if name == "ours_compiled":
            compile_layers(models[name])
        setup_s[name] = time.perf_counter() - t
    # The same objective: the first step's loss from the same weights (no update), every method.
    check = grouped_steps[0]
    first = {}
    for name, (fn, _, self_backward) in methods.items():
        m = models[name]
        loss = fn(m, check)
        if not self_backward:
            loss.backward()
        m.zero_grad(set_to_none=True)
        first[name] = loss.item()
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}

    def run(name: str) -> None:
        fn, steps, self_backward = methods[name]
        for s in steps:
            loss = fn(models[name], s)
            if not self_backward:
                loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

    warm: dict[str, float] = {}
    for name in methods:  # warm-up (and, for ours_compiled, the compile)
        t = time.perf_counter()
        run(name)
        warm[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(args.rounds):
        for name in methods:
            t = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t)
    tps = {n: real / min(v) for n, v in times.items()}
    best_hf = max(("grouped_hf", "packed4d_hf", "flattened_hf"), key=lambda n: tps[n])
    ref = first["grouped_hf"]
    return {
        "model": base_name,
        "samples": len(exs),
        "real_tokens": real,
        "mean_len": round(real / len(exs), 1),
        "padded_tokens_grouped": sum(len(s) * max(map(len, s)) for s in grouped_steps),
        "tokens_per_s": {n: round(v, 1) for n, v in tps.items()},
        "first_step_loss": {n: round(v, 7) for n, v in first.items()},
        "max_loss_difference": max(abs(v - ref) for v in first.values()),
        "best_hf": best_hf,
        "compile_s": round(warm["ours_compiled"] - min(times["ours_compiled"]) + setup_s["ours_compiled"], 1),
        "train_speedup_vs_best_hf": round(tps["ours_compiled"] / tps[best_hf], 3),
        "train_speedup_vs_best_hf_default": round(tps["ours"] / tps[best_hf], 3),
        "train_speedup_vs_padded_hf": round(tps["ours_compiled"] / tps["padded_hf"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny, smollm2-135m")
    ap.add_argument("--samples", type=int, default=0, help="samples per model (default: tiny 256, smollm2 64)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--budget", type=int, default=1024,
                    help="our micro-batch in padded tokens (train.batch_size x train.max_seq_len; 4 x 256 here)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    results = []
    for name in args.models.split(","):
        a = argparse.Namespace(**{**vars(args), "samples": args.samples or (256 if name == "tiny" else 64)})
        r = bench_model(name, a)
        results.append(r)
        print(json.dumps(r), flush=True)
        tag = "tiny" if name == "tiny" else "real"
        print(f"train_speedup_vs_best_hf_{tag}: {r['train_speedup_vs_best_hf']:.2f} (best plain HF: {r['best_hf']}; "
              f"default options {r['train_speedup_vs_best_hf_default']:.2f}; losses agree to "
              f"{r['max_loss_difference']:.1e})", flush=True)
    worst = min(results, key=lambda r: r["train_speedup_vs_best_hf"])
    print(f"train_speedup_vs_best_hf: {worst['train_speedup_vs_best_hf']:.2f} (the lower of the models: {worst['model']})")
    print(f"train_speedup_vs_best_hf_default: {min(r['train_speedup_vs_best_hf_default'] for r in results):.2f}")
    print(f"train_speedup_vs_padded_hf: {min(r['train_speedup_vs_padded_hf'] for r in results):.2f} (reference row)")


if __name__ == "__main__":
    main()
