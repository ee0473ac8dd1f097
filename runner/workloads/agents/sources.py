"""Where an agent's model comes from (a base, a run's checkpoint, a registry version) and agents built from a
job's sections; shared by the serve and tournament recipes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from runner.workloads.agents.answer import AnswerAgent
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.model.packed_attention import enable_packed_scoring


def question_agent_from_spec(q: Any, answer_agent: AnswerAgent | None, writer: tuple[Any, Any] | None,
                             count: Any) -> QuestionAgent:
    bank = []
    if q.bank and (q.sources.get("bank", 0) > 0 or any(w.get("bank", 0) > 0 for w in q.per_topic.values())):
        from runner.workloads.data.sets import load_sources

        bank = load_sources(q.bank, seed=q.seed, max_bad_rows=10**9)
    return QuestionAgent(
        topics=q.topics, mix=dict(q.sources), per_topic={k: dict(v) for k, v in q.per_topic.items()}, bank=bank,
        answer_agent=answer_agent, writer=writer, count_tokens=count, prefer_hard=q.prefer_hard,
        time_limit_s=q.time_limit_s, seed=q.seed,
    )


def resolve_token(value: str | None) -> str | None:
    """The bearer token; `${env:X}` left in a job file copied verbatim (the serving image) is read now. Empty: none."""
    if value is None:
        return None
    from runner.spec.loader import ENV_RE

    value = ENV_RE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    return value or None


def pick_device(name: str = "auto") -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_adapter(path: Path) -> Path:
    """An adapter directory from an adapter, checkpoint or run directory (a run: its latest checkpoint)."""
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    steps = sorted((path / "checkpoints").glob("step-*/adapter/adapter_config.json"))
    if steps:
        return steps[-1].parent
    raise FileNotFoundError(
        f"adapter {path}: no adapter_config.json there, in {path}/adapter/ or in {path}/checkpoints/step-*/adapter/; "
        "point `adapter` at a run directory, a checkpoint, or an adapter directory"
    )


def load_source(source: Any, device: str = "cpu", log: Any = print) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for an AgentSource: the registry version when it resolves, otherwise
    the job-local model (+ adapter). The model is for inference only: it may take the packed scoring path."""
    if getattr(source, "engine", "builtin") != "builtin":
        return _engine_source(source, device, log)
    model, tok, desc = _load_source(source, device, log)
    enable_packed_scoring(model, device)
    return model, tok, desc


def _engine_source(source: Any, device: str, log: Any) -> tuple[Any, Any, str]:
    """An agent source served by vLLM or llama.cpp: the project's tokenizer here, the weights in the engine.
    A registry version is verified first, as for the builtin engine."""
    from transformers import AutoTokenizer

    from runner.workloads.model.loading import base_model_path
    from runner.workloads.scoring.prompts import remember_prompt
    from runner.workloads.serving.engines import start_engine

    adapter: Path | None = None
    gguf: str | None = None
    if source.registry is not None:
        from runner.registry import read_manifest, resolve_artifact
        from runner.workloads.model.artifact import _model_spec, _tokenizer

        vdir = resolve_artifact(source.registry, verify=True)
        manifest = read_manifest(vdir)
        if bool(manifest.get("merged")) and (vdir / "merged").is_dir():
            model_dir = str(vdir / "merged")
        else:
            model_dir, adapter = base_model_path(_model_spec(vdir), log=log), vdir / "adapter"
        tok = _tokenizer(vdir, None)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(model_dir)
        if source.engine == "llamacpp":
            gguf = source.llamacpp.gguf
            if not gguf.endswith(".gguf"):
                from runner.registry.gguf import gguf_file

                gguf = str(gguf_file(vdir, manifest, gguf))
        desc = f"{manifest.get('name', source.registry)}:v{manifest.get('version', '?')}"
        prompt_dir = vdir / "adapter"
    elif source.model is not None:
        model_dir = base_model_path(source.model, log=log)
        tok = AutoTokenizer.from_pretrained(model_dir)
        if source.adapter is not None:
            adapter = find_adapter(Path(source.adapter))
        prompt_dir = adapter
        desc = str(source.model.base) + (f" + {adapter}" if adapter else "")
        if source.engine == "llamacpp":
            gguf = source.llamacpp.gguf  # a path: the spec refuses a GGUF type without a registry version
    else:
        raise ValueError("no model: give `model` or `registry`")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = start_engine(source, tok, model_dir=model_dir, adapter_dir=str(adapter) if adapter else None,
                         gguf=gguf, device=device, log=log)
    if prompt_dir is not None:
        remember_prompt(model, prompt_dir)
    return model, tok, f"{desc} [{source.engine}]"


def _load_source(source: Any, device: str, log: Any) -> tuple[Any, Any, str]:
    if source.registry is not None:
        from runner.registry import IntegrityError, RegistryError
        from runner.workloads.model.artifact import load_artifact

        try:
            model, tok, manifest = load_artifact(source.registry, device)
            return model, tok, f"{manifest.get('name', source.registry)}:v{manifest.get('version', '?')}"
        except IntegrityError:
            raise  # a modified artifact is refused, never silently replaced by another model
        except RegistryError as e:
            if source.model is None:
                raise
            log(f"registry {source.registry} not used ({e}); using the job-local model {source.model.base}")
    if source.model is None:
        raise ValueError("no model: give `model` or `registry`")
    from runner.workloads.model.loading import load_adapter, load_model_and_tokenizer
    from runner.workloads.scoring.prompts import remember_prompt

    model, tok = load_model_and_tokenizer(source.model, device, log=log)
    desc = str(source.model.base)
    if source.adapter is not None:
        adapter = find_adapter(Path(source.adapter))
        model = load_adapter(model, adapter, trainable=False)
        model.eval()
        remember_prompt(model, adapter)
        desc += f" + {adapter}"
    return model, tok, desc
