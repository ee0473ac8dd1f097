"""The `llamacpp` engine: a GGUF file (a registry version's `gguf/<type>.gguf`) run in this process by
llama-cpp-python, asked for exactly the project's token ids.

The GGUF's vocabulary was converted from the project's Hugging Face tokenizer, so token ids agree; `start` checks
that once (the same probe text tokenised both ways) and refuses a GGUF whose ids differ, since letters would then
be read at the wrong ids. llama.cpp's context is not thread-safe: one lock serialises every call.

Every prompt is evaluated whole, from an empty KV cache. Reusing a cached prefix would evaluate only the rest,
and llama.cpp picks its matrix kernels by the number of tokens in a batch: the same question then gets letter
log-probabilities that differ in the second decimal depending on the request before it (measured: -2.81 vs
-2.73), and a seeded sample would not repeat.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.workloads.serving.engines.base import EngineError, EngineModel

SETUP = "run `bash .ci/llamacpp-up.sh` (it builds llama-cpp-python 0.3.36 from its sdist, CPU)"
# Probe text for the vocabulary check: the prompt layout, letters, digits, punctuation, accents and a newline run.
PROBE = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
         "Question: What is 2 + 2?\nA) 3\nB) 4\nC) five\nD) 22\nAnswer: B\n\n"
         "Ça coûte 12,50 € — naïve café; x_1 = (a/b)^2 * 10**-3 ... \"quoted\" 'single' tabs\tand\n\n\nlines")


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise EngineError(f"engine llamacpp needs llama-cpp-python, which this Python cannot import ({e}); {SETUP}") from None
    return llama_cpp


class LlamaCppModel(EngineModel):
    """A GGUF model answering with letter log-probabilities and generating token ids, through llama.cpp."""

    engine = "llamacpp"

    def __init__(self, llm: Any, lib: Any, path: Path, tokenizer: Any, n_ctx: int, description: str) -> None:
        super().__init__(description)
        self._llm: Any = llm
        self._lib = lib
        self.path = path
        self.n_ctx = n_ctx
        self.n_vocab = int(llm.n_vocab())
        self._lock = threading.Lock()
        vocab = lib.llama_model_get_vocab(llm.model)
        self._stops = {int(llm.token_eos())}
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            self._stops.add(eos)
        self._is_eog = (lambda t: bool(lib.llama_vocab_is_eog(vocab, t))) if vocab is not None else (lambda t: False)

    @classmethod
    def start(cls, spec: Any, gguf: str, tokenizer: Any, log: Any = print) -> LlamaCppModel:
        lib = _llama_cpp()
        path = Path(gguf)
        if not path.is_file():
            raise EngineError(f"engine llamacpp: GGUF file {path} does not exist; promote the version with "
                              "`runner promote RUN --to NAME --gguf q8_0` or point llamacpp.gguf at a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EngineError(f"engine llamacpp: {path} is not a GGUF file (no GGUF magic at its start)")
        threads = spec.n_threads or None
        t0 = time.monotonic()
        try:
            llm = lib.Llama(
                model_path=str(path), n_ctx=spec.n_ctx, n_batch=min(512, spec.n_ctx), n_ubatch=min(512, spec.n_ctx),
                n_threads=threads, n_threads_batch=threads or max(1, len(os.sched_getaffinity(0))),
                n_gpu_layers=spec.n_gpu_layers, logits_all=False, verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"engine llamacpp: llama.cpp could not load {path} ({e}); is it a complete GGUF "
                              "written by `runner promote --gguf`?") from None
        description = f"llama.cpp {path.name} (n_ctx {spec.n_ctx})"
        model = cls(llm, lib, path, tokenizer, spec.n_ctx, description)
        try:
            model.check_vocabulary(tokenizer)
        except BaseException:
            model.close()
            raise
        log(f"engine llamacpp: {path} loaded in {time.monotonic() - t0:.1f} s; {model.n_vocab} tokens, ids match "
            "the tokenizer")
        return model

    def check_vocabulary(self, tokenizer: Any) -> None:
        """Refuse a GGUF whose token ids differ from the tokenizer's: the probe text must tokenise identically."""
        hf = [int(t) for t in tokenizer.encode(PROBE, add_special_tokens=False)]
        mine = [int(t) for t in self._llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=False)]
        n_hf = len(tokenizer)
        if mine != hf or self.n_vocab < n_hf:
            at = next((i for i, (a, b) in enumerate(zip(hf, mine, strict=False)) if a != b), min(len(hf), len(mine)))
            raise EngineError(
                f"engine llamacpp: {self.path} does not use this tokenizer's token ids (vocabulary {self.n_vocab} vs "
                f"{n_hf}; a probe text tokenises differently from token {at}: llama.cpp {mine[at:at + 5]} vs "
                f"{hf[at:at + 5]}); serve a GGUF converted from this model (`runner promote ... --gguf`)")

    # --- the two calls ------------------------------------------------------------------------------------------

    def letter_logprobs(self, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                        timeout_s: float | None = None) -> torch.Tensor:
        letters = [int(t) for t in letter_ids]
        if not letters or any(not 0 <= t < self.n_vocab for t in letters):
            raise EngineError(f"engine llamacpp: letter token ids {letters} are not all in the vocabulary "
                              f"(0..{self.n_vocab - 1})")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        out = np.empty((len(prompts), len(letters)), dtype=np.float32)
        with self._acquire(deadline):
            for i, p in enumerate(prompts):
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineError(f"engine llamacpp: {i} of {len(prompts)} prompts scored when the "
                                      f"{timeout_s:.1f} s deadline passed")
                logits = self._last_logits(self._ids(p))
                sel = logits[letters].astype(np.float64)
                sel -= sel.max()
                out[i] = sel - np.log(np.exp(sel).sum())
        return torch.from_numpy(out)

    def generate_ids(self, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, timeout_s: float | None = None) -> list[int]:
        """Stops at an end-of-text token (not included), after `max_new_tokens`, at the context's end, or when
        `timeout_s` has passed (returning what was generated, as transformers' `max_time` does)."""
        ids = self._ids(prompt)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        budget = min(int(max_new_tokens), self.n_ctx - len(ids))
        new: list[int] = []
        if budget <= 0:
            return new
        with self._acquire(deadline):
            llm = self._llm
            llm.set_seed(int(seed) % 2**32 if seed is not None else self._lib.LLAMA_DEFAULT_SEED)
            llm.reset()  # no cached prefix (see the module's note): generate() evaluates the whole prompt
            # temperature 0: greedy; otherwise plain temperature + top-p sampling (no top-k, min-p or penalties)
            for tok in llm.generate(ids, top_k=0, top_p=float(top_p), min_p=0.0, typical_p=1.0,
                                    temp=max(0.0, float(temperature)), repeat_penalty=1.0, reset=True):
                tok = int(tok)
                if tok in self._stops or self._is_eog(tok):
                    break
                new.append(tok)
                if len(new) >= budget or (deadline is not None and time.monotonic() > deadline):
                    break
        return new

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            with self._lock:
                llm.close()

    # --- helpers ------------------------------------------------------------------------------------------------

    def _ids(self, prompt: Sequence[int]) -> list[int]:
        if self._llm is None:
            raise EngineError("engine llamacpp: the model was closed")
        ids = [int(t) for t in prompt]
        if not ids:
            raise EngineError("engine llamacpp: an empty prompt")
        if len(ids) >= self.n_ctx:
            raise EngineError(f"engine llamacpp: a prompt of {len(ids)} tokens does not fit the context of "
                              f"{self.n_ctx} tokens; raise llamacpp.n_ctx")
        bad = next((t for t in ids if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise EngineError(f"engine llamacpp: token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        return ids

    def _last_logits(self, ids: list[int]) -> np.ndarray:
        """Logits of the next token after `ids`, the whole prompt evaluated from an empty cache."""
        llm = self._llm
        llm.reset()  # n_tokens 0: eval() drops the whole KV cache first
        llm.eval(ids)
        ptr = self._lib.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _acquire(self, deadline: float | None) -> _Held:
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):
            raise EngineError("engine llamacpp: busy with another request until the deadline passed")
        return _Held(self._lock)


class _Held:
    """An acquired lock as a context manager (released on exit)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
