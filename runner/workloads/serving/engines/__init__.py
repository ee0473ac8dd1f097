"""Engines behind the agents: a model run by vLLM's server or llama.cpp stands where a transformers model stands.

An `EngineModel` goes into the agents' (model, tokenizer) pairs. The tokenizer stays the project's own (the
base's Hugging Face tokenizer), so prompts, their token ids and the letter token ids are the builtin scorer's,
and the engine is asked for exactly those token ids:

- `letter_logprobs(prompts, letter_ids)`: log-probabilities of each letter as the next token, normalised over
  the letters (what the builtin scorer's softmax over the letter logits gives);
- `generate_ids(prompt, ...)`: the new token ids of one continuation (the question writer, model reasoning).

`start_engine(source, ...)` builds the one an agent source asks for (`engine: vllm | llamacpp`).
"""

from __future__ import annotations

from typing import Any

from runner.workloads.serving.engines.base import (
    EngineError,
    EngineModel,
    close_engines,
    engine_letter_logits,
    is_engine,
)

__all__ = ["EngineError", "EngineModel", "close_engines", "engine_letter_logits", "is_engine", "start_engine"]


def start_engine(source: Any, tokenizer: Any, *, model_dir: str | None, adapter_dir: str | None,
                 gguf: str | None, device: str, log: Any = print) -> EngineModel:
    """The engine `source.engine` names, ready to answer: vLLM serving `model_dir` (+ the LoRA adapter), or
    llama.cpp serving the GGUF file `gguf`."""
    if source.engine == "vllm":
        from runner.workloads.serving.engines.vllm import VllmModel

        if model_dir is None:
            raise EngineError("engine vllm needs a model directory")
        return VllmModel.start(source.vllm, model_dir, adapter_dir, tokenizer, device, log)
    if source.engine == "llamacpp":
        from runner.workloads.serving.engines.llamacpp import LlamaCppModel

        if gguf is None:
            raise EngineError("engine llamacpp needs a GGUF file")
        return LlamaCppModel.start(source.llamacpp, gguf, tokenizer, log)
    raise EngineError(f"unknown engine {source.engine!r}")
