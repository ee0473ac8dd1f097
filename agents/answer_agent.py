"""Answer a file of tournament questions: python -m agents.answer_agent --input_file Q.json --output_file A.json

Input: a JSON list of questions (`{"question", "choices", ...}`; other keys such as `answer` are ignored) or
one JSON object per line. Output: a JSON list, one `{"answer", "reasoning", "confidence"}` per question, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from agents._common import add_model_args, fail, load_model, write_json


def read_questions(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("questions", [data])
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of questions")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.answer_agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input_file", required=True, help="questions (JSON list or JSON lines)")
    ap.add_argument("--output_file", default="outputs/answers.json", help="where to write the answers")
    ap.add_argument("--permutations", type=int, default=0, help="extra passes over shifted choices (debiasing)")
    ap.add_argument("--deadline_s", type=float, default=6.0, help="time per question")
    ap.add_argument("--batch_size", type=int, default=32)
    add_model_args(ap)
    args = ap.parse_args(argv)
    try:
        questions = read_questions(Path(args.input_file))
    except FileNotFoundError:
        return fail(f"{args.input_file}: no such file")
    except (ValueError, json.JSONDecodeError) as e:
        return fail(f"{args.input_file}: {e}")

    from runner.workloads.agents.answer import AnswerAgent, parse_answer_request

    items, bad = [], {}
    for i, q in enumerate(questions):
        try:
            items.append(parse_answer_request(q))
        except ValueError as e:
            bad[i] = str(e)
            print(f"warning: question {i + 1}: {e}; answering A", file=sys.stderr)
    model, tok, desc = load_model(args)
    agent = AnswerAgent([(model, tok)], permutations=args.permutations, deadline_s=args.deadline_s,
                        batch_size=args.batch_size)
    t0 = time.monotonic()
    answers = []
    for s in range(0, len(items), args.batch_size):
        chunk = items[s : s + args.batch_size]
        answers += agent.answer_many(chunk, time.monotonic() + args.deadline_s * len(chunk))
    it = iter(answers)
    out = [{"answer": "A", "reasoning": f"malformed question: {bad[i]}", "confidence": 0.0} if i in bad else next(it)
           for i in range(len(questions))]
    write_json(args.output_file, out)
    print(f"answered {len(out)} questions with {desc} in {time.monotonic() - t0:.1f} s -> {args.output_file}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
