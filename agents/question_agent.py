"""Write tournament questions: python -m agents.question_agent --num_questions N --output_file Q.json

Every question passes the format filter (four lettered choices, one letter, token limits counted with the
model's tokenizer, explanation <= 100 words) before it is written. Sources: `procedural` (logic puzzles with
verified keys), `bank` (an MCQ file, hardest for the own answer agent first) and `model` (written by the LLM,
kept only when the answer agent agrees with its key).
"""

from __future__ import annotations

import argparse
import sys
import time

from agents._common import add_model_args, fail, load_model, write_json

PROCEDURAL = ["seating_linear", "seating_circular", "blood_relations", "syllogisms", "alphanumeric_series"]


def parse_mix(text: str) -> dict[str, float]:
    """'procedural=0.8,model=0.2' -> {'procedural': 0.8, 'model': 0.2}"""
    out = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        out[name.strip()] = float(w) if w else 1.0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.question_agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_questions", type=int, default=20)
    ap.add_argument("--output_file", default="outputs/questions.json")
    ap.add_argument("--topic", action="append", help="topic (repeatable; default: the five logic topics in turn)")
    ap.add_argument("--sources", default="procedural=1", help="source weights, e.g. procedural=0.8,model=0.2,bank=0.5")
    ap.add_argument("--bank", action="append", default=[], help="MCQ file or directory for the `bank` source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_model", action="store_true",
                    help="load no model: procedural/bank only, tokens estimated without a tokenizer")
    add_model_args(ap)
    args = ap.parse_args(argv)
    if args.num_questions < 1:
        return fail("--num_questions must be at least 1")
    try:
        mix = parse_mix(args.sources)
    except ValueError:
        return fail(f"--sources {args.sources!r}: write NAME=WEIGHT pairs, e.g. procedural=0.8,model=0.2")

    from runner.workloads.agents.answer import AnswerAgent
    from runner.workloads.agents.format_filter import approx_token_count, token_counter
    from runner.workloads.agents.question import QuestionAgent

    bank = []
    if args.bank:
        from runner.spec.models import DataSource
        from runner.workloads.data.records import DataError
        from runner.workloads.data.sets import load_sources

        try:
            bank = load_sources([DataSource(path=p) for p in args.bank], seed=args.seed, max_bad_rows=10**9)
        except DataError as e:
            return fail(str(e))
    answer_agent, writer, count, desc = None, None, approx_token_count, "no model"
    if not args.no_model:
        model, tok, desc = load_model(args)
        answer_agent, writer, count = AnswerAgent([(model, tok)]), (model, tok), token_counter(tok)
    try:
        agent = QuestionAgent(topics=args.topic or PROCEDURAL, mix=mix, bank=bank, answer_agent=answer_agent,
                              writer=writer, count_tokens=count, seed=args.seed)
        t0 = time.monotonic()
        questions = agent.generate(None, args.num_questions)
    except (ValueError, RuntimeError) as e:
        return fail(str(e))
    write_json(args.output_file, questions)
    made = ", ".join(f"{k} {v}" for k, v in agent.stats.made.items() if v)
    print(f"wrote {len(questions)} questions ({made}) with {desc} in {time.monotonic() - t0:.1f} s -> {args.output_file}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
