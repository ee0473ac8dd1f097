"""The question agent's `model` source: a few-shot prompt, one sampled generation, and the parse of its text
into a tournament MCQ.

With a chat template the prompt is a system turn saying the layout, then two worked examples as user/assistant
turns (the requested topic's own example is a procedural puzzle when the topic has a generator), then the
request; without one it is the same examples as plain text followed by `Topic: ...` and `Question:`.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import torch
from transformers import StoppingCriteriaList

from runner.workloads.agents import procedural

WRITER_SYSTEM = (
    "You write one multiple-choice logic question on the topic you are given. Use exactly this layout: a line "
    "'Question: ...', four lines 'A) ...' to 'D) ...', a line 'Answer: ' with the letter of the one correct "
    "choice, and a line 'Explanation: ...'."
)
FIXED_EXAMPLES = (
    {"topic": "seating_linear",
     "question": "Five people J, K, L, M and N sit in a row facing north. K sits at the left end. M sits "
                 "immediately to the right of K. Who sits second from the left end?",
     "choices": ["A) J", "B) M", "C) N", "D) L"], "answer": "B",
     "explanation": "K is first from the left and M is right next to K."},
    {"topic": "blood_relations",
     "question": "A is the mother of B. B is the brother of C. How is A related to C?",
     "choices": ["A) Aunt", "B) Sister", "C) Mother", "D) Grandmother"], "answer": "C",
     "explanation": "B and C are siblings, so the mother of B is also the mother of C."},
)
MAX_NEW_TOKENS = 160  # a question within the format's 130 tokens and a short explanation

_LABELLED = re.compile(r"^[ \t]*\(?([A-D])[ \t]*[\).:][ \t]*(.+?)[ \t]*$", re.M)
_QUESTION = re.compile(r"Question[ \t]*\d*[ \t]*[:.][ \t]*", re.I)
_KEY = re.compile(r"(?:correct[ \t]+)?answer[ \t]*(?:is)?[ \t]*[:\-]?[ \t]*\(?([A-D])\b(?![a-z])", re.I)
_EXPLANATION = re.compile(r"explanation[ \t]*[:\-][ \t]*(.+)", re.I)
_DONE = re.compile(r"explanation[ \t]*[:\-][^\n]*\S[^\n]*\n", re.I)


class _EndOfQuestion:
    """Stops generation once the explanation line is complete: what follows it is never read."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), bool(_DONE.search(text)), dtype=torch.bool, device=input_ids.device)


def topic_words(topic: str) -> str:
    return topic.replace("_", " ")


def mcq_text(q: dict[str, Any]) -> str:
    """A question in the layout the writer is asked for."""
    return "\n".join([f"Question: {q['question']}", *q["choices"], f"Answer: {q['answer']}",
                      f"Explanation: {q['explanation']}"])


def examples_for(topic: str, rng: random.Random) -> list[dict[str, Any]]:
    """Two worked examples: one of `topic` when it can be made (a procedural puzzle), one of another topic."""
    own = [procedural.generate(topic, rng).to_tournament()] if topic in procedural.TOPICS else []
    other = [e for e in FIXED_EXAMPLES if e["topic"] != topic]
    return (own + other)[:2]


def writer_prompt(tokenizer: Any, topic: str, examples: list[dict[str, Any]]) -> tuple[list[int], str]:
    """Token ids of the prompt and the text the model's continuation is read after (for the parse)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": WRITER_SYSTEM}]
        for ex in examples:
            messages += [{"role": "user", "content": f"Topic: {topic_words(ex['topic'])}"},
                         {"role": "assistant", "content": mcq_text(ex)}]
        messages.append({"role": "user", "content": f"Topic: {topic_words(topic)}"})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"]), ""
    shots = "".join(f"Topic: {topic_words(ex['topic'])}\n{mcq_text(ex)}\n\n" for ex in examples)
    text = shots + f"Topic: {topic_words(topic)}\nQuestion:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]), "Question:"


@torch.no_grad()
def write_text(model: Any, tokenizer: Any, topic: str, rng: random.Random, deadline: float) -> str:
    """One sampled question text for `topic`, ending before `deadline` (time.monotonic())."""
    ids, lead = writer_prompt(tokenizer, topic, examples_for(topic, rng))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(rng.randrange(2**31))
    out = model.generate(
        input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                               device=device),
        max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=pad,
        max_time=max(0.2, deadline - time.monotonic()),
        stopping_criteria=StoppingCriteriaList([_EndOfQuestion(tokenizer, len(ids))]),
    )
    return lead + tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def parse_mcq(text: str, topic: str, max_words: int = 100) -> dict[str, Any] | None:
    """The first MCQ in a model's text (`Question:`, four `A)`..`D)` lines, `Answer: X`, `Explanation:`), in the
    tournament format; None when it is not there. Lenient about markdown bold, `A.` / `(A)` labels and a
    missing `Question:` label."""
    text = text.replace("**", "").replace("\r", "")
    m = _QUESTION.search(text)
    body = text[m.end():] if m else re.sub(r"^\s*Topic:.*\n", "", text)
    choices: list[str] = []
    start = end = -1
    for lm in _LABELLED.finditer(body):
        if lm.group(1) != "ABCD"[len(choices)]:
            continue
        if not choices:
            start = lm.start()
        choices.append(lm.group(2))
        end = lm.end()
        if len(choices) == 4:
            break
    if len(choices) != 4:
        return None
    question = " ".join(body[:start].split())
    rest = body[end:]
    key = _KEY.search(rest)
    if not question or key is None:
        return None
    letter = key.group(1).upper()
    expl = _EXPLANATION.search(rest[key.end():])
    explanation = " ".join(expl.group(1).split()) if expl else f"The answer is {letter}."
    return {
        "topic": topic,
        "question": question,
        "choices": [f"{L}) {c}" for L, c in zip("ABCD", choices, strict=True)],
        "answer": letter,
        "explanation": " ".join(explanation.split()[:max_words]),
    }
