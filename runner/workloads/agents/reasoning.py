"""Reasoning the model writes for an answer already chosen (`answer.reasoning: model`).

The answer agent picks the letter by scoring; this module then asks the first model, told which choice was
picked, to explain it in a sentence or two: the tokenizer's chat template when it has one, a plain
`Explanation:` continuation otherwise, greedy, at most `max_new_tokens`, within what is left of the deadline.
The text is cut at a sentence (or word) boundary to the format limits, and a text that is empty, garbled, a
copy of the question, or that names another choice as the answer is not used: the caller then writes its
fixed sentence instead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from runner.workloads.agents.format_filter import FormatLimits, TokenCounter, token_counter
from runner.workloads.scoring.prompts import LETTERS
from runner.workloads.serving.engines import is_engine

REASONING_MODES = (True, False, "model")
SYSTEM = ("You are a tutor. Given a multiple-choice question and its correct answer, explain in one or two "
          "short sentences why that answer is correct.")
_LABEL = re.compile(r"(?<![A-Za-z])\(?([A-J])\)")
_CLAIM = re.compile(r"\b(?:answer|option|choice)\s+(?:is\s+)?\(?([A-J])(?![A-Za-z])")
_LEAD = re.compile(r"^(?:explanation|reasoning|reason|because)\s*[:\-]\s*", re.I)
_MIN_WORDS = 3


def check_reasoning_mode(value: Any) -> bool | str:
    """`true` (a fixed sentence), `false` (none) or `"model"` (the model writes it); ValueError otherwise."""
    if isinstance(value, bool) or value == "model":
        return value
    raise ValueError(f"reasoning {value!r}: use true (a fixed sentence), false (no reasoning) or model "
                     "(the model explains the chosen answer)")


def _mentions(text: str, choice: str) -> bool:
    return len(choice) >= 2 and re.search(rf"(?<![a-z0-9]){re.escape(choice)}(?![a-z0-9])", text) is not None


def contradicts(text: str, letter: str, choices: Sequence[str]) -> bool:
    """True when `text` argues for another choice: names another letter as the answer, labels the chosen letter
    with another choice's text, or names other choices' texts but never the chosen one's."""
    for m in _CLAIM.finditer(text):
        if m.group(1) != letter:
            return True
    chosen = choices[LETTERS.index(letter)].lower()
    others = [c.lower() for i, c in enumerate(choices) if LETTERS[i] != letter]
    low = text.lower()
    if not _mentions(low, chosen) and any(_mentions(low, o) for o in others):
        return True
    for m in _LABEL.finditer(text):
        if m.group(1) != letter:
            return True
        after = text[m.end():].strip().lower()
        if not after.startswith(chosen) and any(after.startswith(o) for o in others):
            return True
    return False


def usable(text: str, question: str) -> bool:
    """Enough real words, mostly letters, and not just the question said again."""
    words = text.split()
    if len(words) < _MIN_WORDS:
        return False
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.6 * len(visible):
        return False
    if len(set(w.lower() for w in words)) < 0.25 * len(words):  # a loop: the same few words again and again
        return False
    norm = " ".join(text.lower().split()).rstrip(".")
    return norm not in " ".join(question.lower().split())


def fit(text: str, letter: str, count: TokenCounter, limits: FormatLimits, finished: bool) -> str:
    """Cut `text` to the format limits at a clean boundary: the last full sentence when there is one in the
    second half, otherwise the last whole word (a text cut mid-word by the token budget loses that word)."""
    words = text.split()
    if not finished and words and words[-1][-1] not in ".!?":
        words = words[:-1]  # generation stopped at its budget: the last word may be cut
    words = words[: limits.reasoning_words]
    out = " ".join(words)
    while words and count(letter) + count(out) >= limits.answer_tokens:
        words = words[:-1]
        out = " ".join(words)
    if out and out[-1] not in ".!?":
        end = max(out.rfind(". "), out.rfind("! "), out.rfind("? "))
        if end >= len(out) // 2:
            out = out[: end + 1]
        else:
            out = out.rstrip(",;:-") + "."
    return out


class ReasoningWriter:
    """Writes a short explanation of a chosen answer with one (model, tokenizer) pair, batched."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 64, batch_size: int = 32,
                 limits: FormatLimits = FormatLimits()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.limits = limits
        self.count = token_counter(tokenizer)
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.seconds_per_step: float | None = None  # one generation step of one batch, measured
        self.counts = {"written": 0, "no_time": 0, "failed": 0, "unusable": 0}

    def prompt_ids(self, question: str, choices: Sequence[str], letter: str) -> list[int]:
        lines = [f"Question: {question}"] + [f"{LETTERS[i]}) {c}" for i, c in enumerate(choices)]
        chosen = f"{letter}) {choices[LETTERS.index(letter)]}"
        if self.chat:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": "\n".join(lines) + f"\nCorrect answer: {chosen}"}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
        text = "\n".join(lines) + f"\nAnswer: {chosen}\nExplanation:"
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def write(self, items: Sequence[Any], letters: Sequence[str], deadline: float) -> list[str | None]:
        """One explanation per item (None where the caller's fixed sentence should stand)."""
        out: list[str | None] = []
        for s in range(0, len(items), self.batch_size):
            out += self._batch(items[s : s + self.batch_size], letters[s : s + self.batch_size], deadline)
        return out

    def _steps_that_fit(self, deadline: float) -> int:
        left = deadline - time.monotonic() - 0.05
        if self.seconds_per_step is None:
            return self.max_new_tokens if left > 0.5 else 0  # first call: max_time bounds it
        return max(0, min(self.max_new_tokens, int(left / self.seconds_per_step) - 2))  # -2: the prompt's pass

    @torch.no_grad()
    def _batch(self, items: Sequence[Any], letters: Sequence[str], deadline: float) -> list[str | None]:
        steps = self._steps_that_fit(deadline)
        if steps < 8:
            self.counts["no_time"] += len(items)
            return [None] * len(items)
        try:
            prompts = [self.prompt_ids(it.question, it.choices, L) for it, L in zip(items, letters, strict=True)]
            t0 = time.monotonic()
            rows, ended = self._generate(prompts, steps, deadline)
            made = max((len(r) for r in rows), default=0)
            if made:
                per_step = (time.monotonic() - t0) / (made + 2)
                self.seconds_per_step = (per_step if self.seconds_per_step is None
                                         else 0.7 * self.seconds_per_step + 0.3 * per_step)
        except Exception:  # a model that cannot generate: the fixed sentence stands, the answer is unaffected
            self.counts["failed"] += len(items)
            return [None] * len(items)
        out: list[str | None] = []
        for row, finished, it, letter in zip(rows, ended, items, letters, strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            out.append(self._clean(text, it, letter, finished))
        return out

    def _generate(self, prompts: list[list[int]], steps: int, deadline: float) -> tuple[list[list[int]], list[bool]]:
        """Greedy continuations (cut at the end-of-text token) and whether each ended there."""
        if is_engine(self.model):  # vLLM / llama.cpp: one request per prompt, within the deadline
            rows = [self.model.generate_ids(p, max_new_tokens=steps,
                                            timeout_s=max(0.1, deadline - time.monotonic() - 0.05)) for p in prompts]
            return rows, [len(r) < steps for r in rows]
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
            max_time=max(0.1, deadline - time.monotonic() - 0.05), pad_token_id=self.pad_id,
            no_repeat_ngram_size=4,
        )
        stops = {self.pad_id, self.tokenizer.eos_token_id}
        rows, ended = [], []
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            rows.append(row[:cut])
            ended.append(cut < len(row))
        return rows, ended

    def _clean(self, text: str, item: Any, letter: str, finished: bool) -> str | None:
        if not self.chat:
            text = text.split("\n")[0]  # the plain continuation's explanation is its first line
        text = text.split("\n\n")[0]
        text = _LEAD.sub("", " ".join(text.split()))
        if not usable(text, item.question) or contradicts(text, letter, item.choices):
            self.counts["unusable"] += 1
            return None
        text = fit(text, letter, self.count, self.limits, finished)
        if not usable(text, item.question):
            self.counts["unusable"] += 1
            return None
        self.counts["written"] += 1
        return text
