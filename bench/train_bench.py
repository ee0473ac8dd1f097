"""CPU benchmark: the project's training step vs the plain padded HF + PEFT loop, same model, same samples.

The baseline is the padded mode of ../shared/bench/hf_peft_baseline.py (dynamic padding per batch of 8,
`model(**batch, labels=...)`, full-vocabulary logits at every position). Both sides train the same LoRA on
the same MCQ-like samples (lognormal lengths around ~180 tokens) with the same objective: loss on the answer
token only. Ours packs samples into rows with a block-diagonal mask and computes logits at the answer
positions only. Prints `train_speedup_vs_padded_hf: X.XX` (real tokens/s ratio) for the baseline's tiny shape
with a 32k vocabulary; most of the gain is not computing full-vocabulary logits at every position, so with the
baseline's toy 1,000-token vocabulary (`--also-small-vocab`) the ratio is smaller (packing alone, ~1.4x).

    python bench/train_bench.py [--samples 48] [--rounds 1] [--also-small-vocab]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from runner.workloads.training.packing import Example, answer_loss_sum, collate_packed, pack_rows

# The baseline's "tiny" shape, with a realistic vocabulary so the logits cost what they cost.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(vocab: int, seed: int = 0) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(**TINY, vocab_size=vocab, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(m, lcfg)


def samples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * 0.5 + 5.2).clamp(48, 1024).long().tolist()
    return [Example(ids=torch.randint(0, vocab, (n_,), generator=g).tolist(), label_start=n_ - 1) for n_ in lens]


def padded_hf_step(model: torch.nn.Module, exs: list[Example], opt: torch.optim.Optimizer) -> None:
    T = max(len(e) for e in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    att = torch.zeros(len(exs), T, dtype=torch.long)
    labels = torch.full((len(exs), T), -100, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e)] = torch.tensor(e.ids)
        att[i, : len(e)] = 1
        labels[i, e.label_start :] = ids[i, e.label_start : len(e)]
    out = model(input_ids=ids, attention_mask=att, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def our_step(model: torch.nn.Module, rows: list[list[Example]], opt: torch.optim.Optimizer, pad: int) -> None:
    batch = collate_packed(rows, pad)
    loss = answer_loss_sum(model, batch) / len(batch.targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    exs = samples(args.samples, args.vocab)
    real = sum(len(e) for e in exs)
    results: dict[str, float] = {}
    for name in ("padded_hf", "ours"):
        model = build(args.vocab)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        if name == "padded_hf":
            batches = [exs[i : i + args.batch] for i in range(0, len(exs), args.batch)]

            def run(batches: list = batches, model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
                for b in batches:
                    padded_hf_step(model, b, opt)
        else:
            rows = [[exs[i] for i in r] for r in pack_rows([len(e) for e in exs], args.row_len)]
            steps = [rows[i : i + args.rows] for i in range(0, len(rows), args.rows)]

            def run(steps: list = steps, model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
                for s in steps:
                    our_step(model, s, opt, 0)
        run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            run()
        dt = (time.perf_counter() - t0) / args.rounds
        results[f"{name}_tokens_per_s"] = round(real / dt, 1)
    results["train_speedup_vs_padded_hf"] = round(results["ours_tokens_per_s"] / results["padded_hf_tokens_per_s"], 2)
    return results


def check_same_loss(vocab: int) -> float:
    """Both paths compute the same objective: answer-token cross-entropy (max abs difference)."""
    model = build(vocab)
    exs = samples(6, vocab, seed=1)
    with torch.no_grad():
        T = max(len(e) for e in exs)
        ids = torch.zeros(len(exs), T, dtype=torch.long)
        att = torch.zeros(len(exs), T, dtype=torch.long)
        for i, e in enumerate(exs):
            ids[i, : len(e)] = torch.tensor(e.ids)
            att[i, : len(e)] = 1
        logits = model(input_ids=ids, attention_mask=att).logits
        ref = torch.stack([F.cross_entropy(logits[i, len(e) - 2], torch.tensor(e.ids[-1])) for i, e in enumerate(exs)])
        batch = collate_packed([[e] for e in exs], 0)
        ours = answer_loss_sum(model, batch) / len(exs)
    return float((ref.mean() - ours).abs())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8, help="baseline batch size (padded)")
    ap.add_argument("--row-len", type=int, default=1024, help="our packed row length")
    ap.add_argument("--rows", type=int, default=2, help="our packed rows per step")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (32k: Llama-2/Mistral size)")
    ap.add_argument("--also-small-vocab", action="store_true", help="also run the baseline's own 1,000 vocabulary")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    diff = check_same_loss(args.vocab)
    res = bench(args)
    res["loss_difference"] = diff
    res["vocab"] = args.vocab
    print(json.dumps(res))
    if args.also_small_vocab:
        small = bench(argparse.Namespace(**{**vars(args), "vocab": 1000}))
        small["vocab"] = 1000
        print(json.dumps(small))
        print(f"train_speedup_vs_padded_hf_vocab1000: {small['train_speedup_vs_padded_hf']:.2f}")
    print(f"train_speedup_vs_padded_hf: {res['train_speedup_vs_padded_hf']:.2f}")


if __name__ == "__main__":
    main()
