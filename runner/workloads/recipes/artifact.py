"""Registry steps that need torch, run in the workload environment:

    python -m runner.workloads.recipes.artifact answer REF_OR_DIR --question '{"question": ..., "choices": [...]}'
    python -m runner.workloads.recipes.artifact answer REF_OR_DIR --mmlu FILE.csv --index N
    python -m runner.workloads.recipes.artifact merge VERSION_DIR OUT_DIR        (used by `runner promote --merge`)
    python -m runner.workloads.recipes.artifact bundle-base JOB_YAML OUT_DIR     (`runner promote`, offline bases)
    python -m runner.workloads.recipes.artifact gguf MERGED_DIR OUT_DIR --types q8_0,q4_k_m   (`runner promote --gguf`)"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from runner.registry import IntegrityError, RegistryError
from runner.workloads.model.artifact import bundle_base, load_artifact, merge


def answer(model: Any, tokenizer: Any, question: str, choices: list[str]) -> dict[str, Any]:
    from runner.workloads.scoring.prompts import LETTERS, resolve_prompt
    from runner.workloads.scoring.scorer import score_mcq

    class _Item:
        def __init__(self) -> None:
            self.question, self.choices = question, choices

    # scored in the style the version was trained with (its adapter's prompt.json), as the service does
    probs = score_mcq(model, tokenizer, [_Item()], batch_size=1, prompt=resolve_prompt(None, model))[0]
    k = int(probs.argmax())
    return {"answer": LETTERS[k], "confidence": round(float(probs[k]), 4),
            "probs": {LETTERS[i]: round(float(probs[i]), 4) for i in range(len(choices))}}


def _mmlu_item(path: Path, index: int) -> dict[str, Any]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    r = rows[index]
    return {"question": r[0], "choices": r[1:-1], "gold": r[-1].strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.workloads.recipes.artifact", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("answer", help="Load a registry version and answer one question (prints JSON).")
    a.add_argument("ref", help="NAME@alias, NAME:vN, or a version directory.")
    a.add_argument("--question", help='JSON: {"question": ..., "choices": [...]}')
    a.add_argument("--mmlu", help="An MMLU CSV file (question,A,B,C,D,answer).")
    a.add_argument("--index", type=int, default=0, help="Row of --mmlu to answer.")
    m = sub.add_parser("merge", help="Write merged full weights of a version directory.")
    m.add_argument("vdir")
    m.add_argument("out")
    b = sub.add_parser("bundle-base", help="Copy the offline base a run trained on (tiny, smollm2-135m).")
    b.add_argument("job_yaml")
    b.add_argument("out")
    g = sub.add_parser("gguf", help="Write GGUF files of merged weights with llama.cpp's converter and quantiser.")
    g.add_argument("merged")
    g.add_argument("out")
    g.add_argument("--types", required=True, help="Comma-separated GGUF types, e.g. q8_0,q4_k_m.")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        if args.cmd == "merge":
            merge(Path(args.vdir), Path(args.out))
        elif args.cmd == "bundle-base":
            bundle_base(Path(args.job_yaml), Path(args.out))
        elif args.cmd == "gguf":
            from runner.registry.gguf import parse_gguf_types
            from runner.workloads.model.gguf import write_ggufs

            write_ggufs(Path(args.merged), Path(args.out), parse_gguf_types(args.types),
                        log=lambda m: print(m, file=sys.stderr))
        else:
            if args.mmlu:
                item = _mmlu_item(Path(args.mmlu), args.index)
            elif args.question:
                item = json.loads(args.question)
            else:
                ap.error("answer needs --question or --mmlu")
            model, tok, manifest = load_artifact(args.ref)
            out = answer(model, tok, str(item["question"]), [str(c) for c in item["choices"]])
            out["model"] = f"{manifest['name']}:v{manifest['version']}"
            if "gold" in item:
                out["gold"] = item["gold"]
            print(json.dumps(out))
    except IntegrityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
