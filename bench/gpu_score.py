"""MCQ scoring throughput on a GPU: the project's scorer against the naive loops, same process, same questions.

Random-init Qwen2-architecture models (Qwen2.5 7B / 0.5B shapes, bf16, SDPA), ~150-token prompts (lognormal),
4 choices. Prints one JSON line per measurement and a summary. `--size tiny` runs on CPU in seconds.

    python bench/gpu_score.py --size 7b,0.5b        # on a GPU, ~2-3 minutes
    python bench/gpu_score.py --size tiny           # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model_shapes import SIZES  # noqa: E402  (bench/ is on sys.path when run as a script)

from runner.workloads.model.packed_attention import enable_packed_attention
from runner.workloads.scoring.prompts import LETTERS, format_prompt
from runner.workloads.scoring.scorer import (
    compile_decoder_layers,
    letter_token_ids,
    score_mcq,
    score_mcq_per_choice,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
PEAK_FLOPS = {"cuda": 790e12}  # measured bf16 matmul rate of an H200 (BENCHMARKS.md); MFU is relative to it


@dataclass
class Item:
    question: str
    choices: list[str]


class WordTokenizer:
    """One token per whitespace-separated word (no weights can be fetched): 'w123' -> id 123, letters fixed ids."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def _ids(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if len(w) == 1 and w in LETTERS:
                out.append(10 + LETTERS.index(w))
            elif w[0] == "w" and w[1:].isdigit():
                out.append(100 + int(w[1:]) % (self.vocab - 100))
            else:
                out.append(100 + zlib.crc32(w.encode()) % (self.vocab - 100))
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._ids(text)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        return {"input_ids": [self._ids(t) for t in texts]}


def make_items(n: int, seed: int = 0, mu: float = 5.0, sigma: float = 0.5) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = int(min(1024, max(48, math.exp(rng.gauss(mu, sigma)))))
        choices = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(3)) for _ in range(4)]
        q_words = max(1, length - 19)  # 'Question:' + 4 x (letter + 3 words) + 'Answer:' = 19 tokens
        items.append(Item(" ".join(f"w{rng.randrange(10**6)}" for _ in range(q_words)), choices))
    return items


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


@torch.no_grad()
def naive_loop(model: Any, tok: WordTokenizer, items: list[Item]) -> torch.Tensor:
    """What a user writes first: one question per forward, full logits, a host sync per question."""
    letters = letter_token_ids(tok, 4)
    out = []
    for it in items:
        ids = torch.tensor([tok.encode(format_prompt(it.question, it.choices))], device=DEV)
        logits = model(input_ids=ids).logits[0, -1, letters]
        out.append(int(logits.argmax()))
    return torch.tensor(out)


def _left_padded_batches(model: Any, tok: WordTokenizer, items: list[Item], bsz: int, by_length: bool) -> torch.Tensor:
    """Fixed batches of `bsz` (sorted by length or as given), left padding + mask, logits_to_keep=1;
    predictions in batch order."""
    letters = torch.tensor(letter_token_ids(tok, 4), device=DEV)
    prompts = tok([format_prompt(it.question, it.choices) for it in items])["input_ids"]
    order = list(range(len(prompts)))
    if by_length:
        order.sort(key=lambda i: len(prompts[i]))
    out = []
    for s in range(0, len(order), bsz):
        chunk = [prompts[i] for i in order[s : s + bsz]]
        T = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, T - len(p) :] = torch.tensor(p)
            att[r, T - len(p) :] = 1
        logits = model(input_ids=ids.to(DEV), attention_mask=att.to(DEV), logits_to_keep=1).logits[:, -1]
        out.append(logits.index_select(-1, letters).argmax(-1))
    return torch.cat(out).cpu()


@torch.no_grad()
def unsorted_batches(model: Any, tok: WordTokenizer, items: list[Item], bsz: int = 64) -> torch.Tensor:
    """The baseline's single pass: unsorted batches of 64, left padding + mask, logits_to_keep=1."""
    return _left_padded_batches(model, tok, items, bsz, by_length=False)


@torch.no_grad()
def sorted_fixed_batches(model: Any, tok: WordTokenizer, items: list[Item], bsz: int = 128) -> torch.Tensor:
    """BENCHMARKS.md's better baseline: sorted by length, fixed batches of 128, left padding, one sync at the end."""
    return _left_padded_batches(model, tok, items, bsz, by_length=True)


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    sync()
    t0 = time.perf_counter()
    r = fn(*args, **kw)
    sync()
    return r, time.perf_counter() - t0


def bench_size(
    size: str, n: int, n_slow: int, configs: list[tuple[int, int | None]], compile_layers: bool
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tok = WordTokenizer(cfg.vocab_size)
    items = make_items(n)
    tokens = sum(len(p) for p in tok([format_prompt(i.question, i.choices) for i in items])["input_ids"])
    results: dict[str, float] = {}

    def record(method: str, n_q: int, dt: float, **extra: Any) -> None:
        qps = n_q / dt
        mfu = qps * (tokens / n) * 2 * n_params / PEAK_FLOPS[DEV] if DEV in PEAK_FLOPS else None
        results[method] = qps
        emit(bench="score", size=size, method=method, n_q=n_q, q_per_s=round(qps, 1),
             mfu_2N=round(mfu, 4) if mfu else None, **extra)

    # Warm-up: kernels, allocator, cuBLAS heuristics for a spread of shapes.
    score_mcq(model, tok, items[:256], batch_size=128, padding="right")
    score_mcq(model, tok, items[:256], batch_size=128, padding="left")

    _, dt = timed(naive_loop, model, tok, items[:n_slow])
    record("naive_per_question", n_slow, dt)
    n_unsorted = min(n, 512)
    _, dt = timed(unsorted_batches, model, tok, items[:n_unsorted])
    record("unsorted_left_pad_b64", n_unsorted, dt)
    _, dt = timed(sorted_fixed_batches, model, tok, items)
    record("sorted_fixed_left_pad_b128", n, dt)
    left, dt = timed(score_mcq, model, tok, items, batch_size=128, padding="left")
    record("ours_left_pad_b128", n, dt)
    right = None
    for b, mt in configs:
        r, dt = timed(score_mcq, model, tok, items, batch_size=b, max_batch_tokens=mt, padding="right")
        record(f"ours_b{b}_t{mt or 0}", n, dt, batch=b, max_batch_tokens=mt)
        right = r if right is None else right
    assert right is not None
    agree = float((right.argmax(-1) == left.argmax(-1)).float().mean())
    emit(bench="agreement", size=size, right_vs_left_argmax=round(agree, 4),
         max_abs_prob_diff=round(float((right - left).abs().max()), 4))
    pc, dt = timed(score_mcq_per_choice, model, tok, items[:n_slow], batch_size=128)
    record("per_choice_b128", n_slow, dt)
    if compile_layers:
        try:
            t0 = time.perf_counter()
            compile_decoder_layers(model)
            score_mcq(model, tok, items[:512], batch_size=128, padding="right")  # compiles
            emit(bench="compile", size=size, warmup_s=round(time.perf_counter() - t0, 1))
            for b, mt in configs:
                _, dt = timed(score_mcq, model, tok, items, batch_size=b, max_batch_tokens=mt, padding="right")
                record(f"ours_b{b}_t{mt or 0}_compiled", n, dt, batch=b, max_batch_tokens=mt)
        except Exception as e:  # a compiler failure must not hide the other numbers
            emit(bench="compile", size=size, error=f"{type(e).__name__}: {str(e)[:300]}")
    try:  # prompts packed into rows, variable-length attention, last layer only at the answer positions
        if not enable_packed_attention(model):
            raise RuntimeError("packed attention could not be enabled")
        score_mcq(model, tok, items[:256], batch_size=128, padding="packed")  # warm-up
        for b, mt in configs:
            packed, dt = timed(score_mcq, model, tok, items, batch_size=b, max_batch_tokens=mt, padding="packed")
            record(f"ours_packed_b{b}_t{mt or 0}", n, dt, batch=b, max_batch_tokens=mt)
        emit(bench="agreement", size=size, packed_vs_right_argmax=round(float((packed.argmax(-1) == right.argmax(-1))
             .float().mean()), 4), max_abs_prob_diff=round(float((packed - right).abs().max()), 4))
    except Exception as e:  # a kernel missing on this GPU/PyTorch must not hide the other numbers
        emit(bench="packed", size=size, error=f"{type(e).__name__}: {str(e)[:300]}")
    best = max(v for k, v in results.items() if k.startswith("ours_"))
    emit(bench="summary", size=size, device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
         params_b=round(n_params / 1e9, 2), mean_prompt_tokens=round(tokens / n, 1), ours_best_q_per_s=round(best, 1),
         vs_naive=round(best / results["naive_per_question"], 2),
         vs_unsorted_b64=round(best / results["unsorted_left_pad_b64"], 2),
         vs_sorted_fixed_b128=round(best / results["sorted_fixed_left_pad_b128"], 2),
         vs_per_choice=round(best / results["per_choice_b128"], 2))
    del model
    if DEV == "cuda":
        emit(bench="memory", size=size, peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="7b,0.5b" if DEV == "cuda" else "tiny", help="comma-separated: tiny, 0.5b, 7b")
    ap.add_argument("--n", type=int, default=None, help="questions (default 2048 on GPU, 64 on CPU)")
    ap.add_argument("--compile", default="7b", help="comma-separated sizes to also measure with compiled layers")
    ap.add_argument("--configs", default="128:0,512:32768,512:65536",
                    help="the project's scorer settings to try, BATCH:MAX_BATCH_TOKENS (0 = no token cap)")
    args = ap.parse_args()
    n = args.n or (2048 if DEV == "cuda" else 64)
    n_slow = min(n, 128 if DEV == "cuda" else 16)
    configs = [(int(b), int(t) or None) for b, t in (c.split(":") for c in args.configs.split(","))]
    emit(bench="env", torch=torch.__version__, device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu")
    if DEV == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for size in args.size.split(","):
        size = size.strip()
        bench_size(size, n, n_slow, configs, size in args.compile.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
