"""Do the serving engines answer as the builtin scorer does? The same MMLU val questions, the same prompts and
letter token ids, scored by the builtin engine (transformers, fp32) and by each engine asked for; prints the share
of same letters, the largest probability difference and the scoring time of each.

    python bench/engine_agreement.py [--n 200] [--adapter DIR] [--vllm float32,bfloat16] [--gguf FILE.gguf ...]

The base is the real `smollm2-135m` (or `--base DIR`). `--gguf` files must be conversions of the same weights
(base + adapter merged), e.g. a registry version's gguf/q8_0.gguf.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MMLU = ROOT.parent / "shared" / "data" / "mmlu" / "val"


def questions(n: int) -> list[Any]:
    from runner.spec.models import DataSource
    from runner.workloads.data.sets import load_sources

    recs = [r for r in load_sources([DataSource(path=str(MMLU), format="mmlu_csv")], base_dir=ROOT)
            if len(r.choices) == 4]
    recs.sort(key=lambda r: r.id)
    step = max(1, len(recs) // n)
    return [SimpleNamespace(question=r.question, choices=r.choices) for r in recs[::step][:n]]


def compare(name: str, probs: Any, ref: Any, seconds: float) -> dict[str, Any]:
    same = float((probs[:, :4].argmax(-1) == ref[:, :4].argmax(-1)).float().mean())
    diff = float((probs[:, :4] - ref[:, :4]).abs().max())
    print(f"engine_agreement_{name}: {same:.4f} (largest probability difference {diff:.2e}, {seconds:.1f} s)")
    return {"engine": name, "same": same, "diff": diff, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--adapter")
    ap.add_argument("--vllm", default="float32,bfloat16", help="vLLM dtypes to compare ('' for none)")
    ap.add_argument("--gguf", nargs="*", default=[], help="GGUF files to compare through llama.cpp")
    args = ap.parse_args()

    import torch

    from runner.spec.engines import LlamaCppSpec, VllmSpec
    from runner.spec.models import ModelSpec
    from runner.spec.serve import AgentSource
    from runner.workloads.agents.sources import load_source
    from runner.workloads.model.loading import base_model_path
    from runner.workloads.scoring.scorer import score_mcq

    torch.set_num_threads(2)
    items = questions(args.n)
    quiet = lambda _m: None  # noqa: E731
    source = AgentSource(model=ModelSpec(base=args.base), adapter=args.adapter)
    model, tok, desc = load_source(source, "cpu", log=quiet)
    t = time.perf_counter()
    ref = score_mcq(model, tok, items)
    print(f"{desc}: {len(items)} MMLU val questions; builtin (fp32) {time.perf_counter() - t:.1f} s")
    del model
    rows = []
    model_dir = base_model_path(ModelSpec(base=args.base), log=quiet)
    for dtype in [d for d in args.vllm.split(",") if d]:
        from runner.workloads.serving.engines.vllm import VllmModel

        adapter = None
        if args.adapter:
            from runner.workloads.agents.sources import find_adapter

            adapter = str(find_adapter(Path(args.adapter)))
        eng = VllmModel.start(VllmSpec(dtype=dtype, max_num_seqs=64), model_dir, adapter, tok, "cpu", log=quiet)
        try:
            t = time.perf_counter()
            probs = score_mcq(eng, tok, items)
            rows.append(compare(f"vllm_{dtype}", probs, ref, time.perf_counter() - t))
        finally:
            eng.close()
    for gguf in args.gguf:
        from runner.workloads.serving.engines.llamacpp import LlamaCppModel

        eng = LlamaCppModel.start(LlamaCppSpec(gguf=str(Path(gguf).resolve())), str(gguf), tok, quiet)
        try:
            t = time.perf_counter()
            probs = score_mcq(eng, tok, items)
            rows.append(compare(f"llamacpp_{Path(gguf).stem}", probs, ref, time.perf_counter() - t))
        finally:
            eng.close()
    print("| engine | same letters | largest prob. difference | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {100 * r['same']:.1f}% | {r['diff']:.2e} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
