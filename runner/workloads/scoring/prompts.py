"""How an MCQ is shown to the model: one prompt contract shared by training, scoring, the agents and the service.

Three styles (`prompt.style` of train, eval and serve jobs):

- `plain`: `Question: ...`, `A) ...` lines, `Answer:`; the answer is ` A` (the tokenizer's special tokens added,
  as the project has always trained and scored).
- `mmlu`: lm-evaluation-harness 0.4.x's default zero-shot MMLU prompt: the subject header line
  (`The following are multiple choice questions (with answers) about SUBJECT.` and a blank line), the question,
  `A. ...` lines, `Answer:`; the continuations are ` A`, ` B`, ... and no special tokens are added (lm-eval's
  default for causal models).
- `chat`: the tokenizer's chat template, the question and lettered choices as the user turn (after an optional
  system turn) and the answer letter as the first token of the assistant turn.

The letter tokens are found per tokenizer and style, the way lm-eval splits a context from its continuation:
encode the prompt, encode prompt + continuation, and the continuation's token is what follows the prompt's
tokens. A tokenizer on which a letter is not exactly one token after the prompt is refused with the style named.
This module imports no torch: tokenizers are used through `__call__` / `encode` / `apply_chat_template`.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = "ABCDEFGHIJ"
STYLES = ("plain", "chat", "mmlu")
_PREFIX = re.compile(r"^\s*\(?([A-J])[\).:]\s+")
CHAT_INSTRUCTION = "Answer with the letter of the correct choice."


def strip_choice_prefix(choice: str) -> str:
    """'B) Paris' -> 'Paris' (tournament choices carry their letter; records do not)."""
    return _PREFIX.sub("", choice, count=1).strip()


def _check_choices(choices: Sequence[str]) -> None:
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"an MCQ needs 2-{len(LETTERS)} choices, got {len(choices)}")


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """The plain style: the question, its lettered choices and 'Answer:'; the model's next token is ' A', ' B', ..."""
    _check_choices(choices)
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}) {strip_choice_prefix(c)}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def mmlu_prompt(question: str, choices: Sequence[str], topic: str | None = None) -> str:
    """lm-eval's default MMLU prompt (task `mmlu_SUBJECT`, zero-shot): description line, question, `A.` choices."""
    _check_choices(choices)
    header = ""
    if topic:
        header = f"The following are multiple choice questions (with answers) about {topic.replace('_', ' ')}.\n\n"
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)] + ["Answer:"]
    return header + "\n".join(lines)


def chat_user_turn(question: str, choices: Sequence[str]) -> str:
    """The user turn of the chat style."""
    _check_choices(choices)
    lines = [question.strip(), ""] + [f"{LETTERS[i]}) {strip_choice_prefix(c)}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", CHAT_INSTRUCTION])


def answer_text(letter: str) -> str:
    """The plain style's completion trained after the prompt: a space and the letter."""
    return f" {letter}"


@dataclass(frozen=True)
class PromptStyle:
    """What `prompt:` in a job says: the style and, for `chat`, an optional system turn."""

    style: str = "plain"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"prompt.style {self.style!r}: use one of {', '.join(STYLES)}")

    @classmethod
    def of(cls, spec: Any) -> PromptStyle:
        """From a job's `prompt` section (a pydantic model, a dict, a PromptStyle) or None (plain)."""
        if spec is None:
            return PLAIN
        if isinstance(spec, PromptStyle):
            return spec
        if isinstance(spec, dict):
            return cls(style=spec.get("style", "plain"), system=spec.get("system"))
        return cls(style=spec.style, system=getattr(spec, "system", None))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"style": self.style}
        if self.system is not None:
            d["system"] = self.system
        return d

    def __str__(self) -> str:
        return self.style + (" (with a system turn)" if self.system else "")


PLAIN = PromptStyle()


class Prompter:
    """A prompt style bound to a tokenizer: prompt texts, their token ids, and the letter token ids."""

    def __init__(self, tokenizer: Any, style: PromptStyle = PLAIN) -> None:
        self.tokenizer = tokenizer
        self.style = style
        if style.style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt.style chat: the tokenizer ({type(tokenizer).__name__}, {_name(tokenizer)}) has no chat "
                "template; use prompt.style plain or mmlu, or a model that ships one"
            )
        if style.system is not None and style.style != "chat":
            raise ValueError(f"prompt.system is used only by prompt.style chat (this job has {style.style})")
        # plain adds the tokenizer's special tokens (as training always did); lm-eval adds none to causal models;
        # a chat template writes its own.
        self.special_tokens = style.style == "plain"
        self.letter_ids = self._letter_ids()

    def continuation(self, letter: str) -> str:
        return letter if self.style.style == "chat" else f" {letter}"

    def text(self, question: str, choices: Sequence[str], topic: str | None = None) -> str:
        if self.style.style == "plain":
            return format_prompt(question, choices)
        if self.style.style == "mmlu":
            return mmlu_prompt(question, choices, topic)
        messages = [{"role": "system", "content": self.style.system}] if self.style.system else []
        messages.append({"role": "user", "content": chat_user_turn(question, choices)})
        out = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(out)

    def item_text(self, item: Any) -> str:
        return self.text(item.question, item.choices, getattr(item, "topic", None))

    def encode(self, items: Sequence[Any]) -> list[list[int]]:
        """Token ids of each item's prompt."""
        texts = [self.item_text(it) for it in items]
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=self.special_tokens)["input_ids"]]

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.special_tokens)["input_ids"])

    def answer_ids(self, letter: str) -> list[int]:
        """The completion trained after the prompt: the letter's one token."""
        return [self.letter_ids[LETTERS.index(letter)]]

    def choice_ids(self, choice: str) -> list[int]:
        """A choice's text as the continuation (the per-choice cross-check)."""
        text = strip_choice_prefix(choice)
        if self.style.style != "chat":
            text = " " + text
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _letter_ids(self) -> list[int]:
        sample = self.text("Which one?", ["first", "second"], "general")
        ctx = self.encode_text(sample)
        ids = []
        for letter in LETTERS:
            whole = self.encode_text(sample + self.continuation(letter))
            if whole[: len(ctx)] == ctx and len(whole) == len(ctx) + 1:
                ids.append(whole[-1])
                continue
            alone = self.tokenizer.encode(self.continuation(letter), add_special_tokens=False)
            if len(alone) != 1:
                raise ValueError(
                    f"prompt.style {self.style.style}: the tokenizer ({_name(self.tokenizer)}) writes the answer "
                    f"{self.continuation(letter)!r} as {len(alone)} tokens; single-pass scoring needs one token "
                    "per letter: try another prompt.style"
                )
            ids.append(alone[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"tokenizer {_name(self.tokenizer)} maps different answer letters to one token: {ids}")
        return ids


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


_PROMPTERS: weakref.WeakKeyDictionary[Any, dict[PromptStyle, Prompter]] = weakref.WeakKeyDictionary()


def prompter(tokenizer: Any, style: Any = None) -> Prompter:
    """The Prompter of `tokenizer` for `style` (a PromptStyle, a job's `prompt` section, or None = plain);
    cached per tokenizer."""
    if isinstance(style, Prompter):
        return style
    ps = PromptStyle.of(style)
    per: dict[PromptStyle, Prompter] | None = None
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        per = _PROMPTERS.setdefault(tokenizer, {})
    if per is not None and ps in per:
        return per[ps]
    p = Prompter(tokenizer, ps)
    if per is not None:
        per[ps] = p
    return p


# --- the style an adapter was trained with ------------------------------------------------------------

PROMPT_FILE = "prompt.json"  # in an adapter directory: {"style": ..., "system": ...}


def write_prompt_file(adapter_dir: Any, style: PromptStyle) -> None:
    import json
    from pathlib import Path

    (Path(adapter_dir) / PROMPT_FILE).write_text(json.dumps(style.to_dict(), indent=2) + "\n")


def read_prompt_file(adapter_dir: Any) -> PromptStyle | None:
    """The style recorded beside an adapter; None when there is none (adapters from before styles: plain)."""
    import json
    from pathlib import Path

    path = Path(adapter_dir) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        return PromptStyle(style=d["style"], system=d.get("system"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a prompt record ({e}); expected {{\"style\": \"plain|chat|mmlu\"}}") from e


def remember_prompt(model: Any, adapter_dir: Any) -> None:
    """Keep the adapter's recorded style on the loaded model, for `resolve_prompt`."""
    style = read_prompt_file(adapter_dir)
    if style is not None:
        with contextlib.suppress(AttributeError, TypeError):
            model._qa_prompt = style


def resolve_prompt(explicit: Any, model: Any, warn: Any = None) -> PromptStyle:
    """A job's `prompt` when set, else the style the model's adapter was trained with, else plain."""
    trained = getattr(model, "_qa_prompt", None)
    if explicit is None:
        return trained if isinstance(trained, PromptStyle) else PLAIN
    style = PromptStyle.of(explicit)
    if isinstance(trained, PromptStyle) and trained != style and warn is not None:
        warn(f"the adapter was trained with prompt.style {trained}; this job uses {style}")
    return style
