"""Eval benchmark on CPU: the project's letter scorer against the best plain HF scorer a competent user writes,
and against the lm-eval style per-choice method.

Same tiny model (the runner's pretrained `tiny` base, cached under $RUNNER_CACHE), same questions, one process,
interleaved repeats. The competent baseline (`single_pass_hf`) scores each question in one forward too:
length-sorted batches, left-padded with position ids from the mask, `logits_to_keep=1`, the letter tokens'
logits at the last position. The headline is `eval_speedup_vs_best_hf` (against the faster of that and the
per-choice method); `eval_speedup_vs_per_choice` is kept as a reference row. Predictions of all three agree.

    python bench/eval_bench.py [--n 400] [--repeats 3] [--data builtin:categories?per_topic=60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="questions")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each method (interleaved)")
    ap.add_argument("--data", default="builtin:categories?per_topic=60&topics=food,animals,music,geography,sports",
                    help="MCQ source (a path or builtin:...); the default is what the tiny base was pretrained on")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    args = ap.parse_args()

    import torch

    from runner.spec.models import DataSource, ModelSpec
    from runner.workloads.data.sets import load_sources, subsample
    from runner.workloads.model.loading import load_model_and_tokenizer
    from runner.workloads.model.packed_attention import enable_packed_scoring
    from runner.workloads.scoring.prompts import LETTERS
    from runner.workloads.scoring.scorer import (
        encode_prompts,
        letter_token_ids,
        score_mcq,
        score_mcq_per_choice,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(ModelSpec(base="tiny"), "cpu", log=lambda m: print(f"# {m}", flush=True))
    enable_packed_scoring(model, "cpu")  # as the eval kind does on a CPU: letters scored from packed rows
    records = subsample(load_sources([DataSource(path=args.data)]), args.n, 0)
    gold = torch.tensor([LETTERS.index(r.answer) for r in records])
    tokens = sum(len(p) for p in encode_prompts(tok, records))
    print(f"eval_questions: {len(records)}")
    print(f"eval_mean_prompt_tokens: {tokens / len(records):.1f}")
    print(f"eval_mean_choices: {sum(len(r.choices) for r in records) / len(records):.2f}")

    def letters():  # noqa: ANN202
        return score_mcq(model, tok, records, args.batch_size)

    def per_choice():  # noqa: ANN202
        return score_mcq_per_choice(model, tok, records, args.batch_size)

    prompts = encode_prompts(tok, records)
    letter_ids = torch.tensor(letter_token_ids(tok))
    pad = tok.pad_token_id

    @torch.no_grad()
    def single_pass_hf():  # noqa: ANN202
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.empty(len(prompts), len(letter_ids))
        for j in range(0, len(order), args.batch_size):
            idx = order[j : j + args.batch_size]
            T = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            att = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, T - len(prompts[i]):] = 1
            pos = (att.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1]
            out[torch.tensor(idx)] = logits[:, letter_ids].float()
        return out

    letters(), per_choice(), single_pass_hf()  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"letters": [], "per_choice": [], "single_pass_hf": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("letters", letters), ("per_choice", per_choice), ("single_pass_hf", single_pass_hf)):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    t_l, t_p = statistics.median(times["letters"]), statistics.median(times["per_choice"])
    t_h = statistics.median(times["single_pass_hf"])
    print("# seconds per pass: " + ", ".join(f"{k} {[round(t, 3) for t in v]}" for k, v in times.items()))
    p_l, p_p = results["letters"].argmax(-1), results["per_choice"].argmax(-1)
    print(f"eval_letters_questions_per_s: {len(records) / t_l:.1f}")
    print(f"eval_per_choice_questions_per_s: {len(records) / t_p:.1f}")
    print(f"eval_letters_accuracy: {float((p_l == gold).float().mean()):.4f}")
    print(f"eval_per_choice_accuracy: {float((p_p == gold).float().mean()):.4f}")
    p_h = results["single_pass_hf"].argmax(-1)
    print(f"eval_single_pass_hf_questions_per_s: {len(records) / t_h:.1f}")
    print(f"eval_agreement_letters_vs_per_choice: {float((p_l == p_p).float().mean()):.4f}")
    print(f"eval_agreement_letters_vs_single_pass_hf: {float((p_l == p_h).float().mean()):.4f}")
    best = min(t_p, t_h)
    print(f"eval_speedup_vs_best_hf: {best / t_l:.2f} (best plain scorer: "
          f"{'single_pass_hf' if t_h <= t_p else 'per_choice'})")
    print(f"eval_speedup_vs_per_choice: {t_p / t_l:.2f} (reference row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
