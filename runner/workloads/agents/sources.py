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
    model, tok, desc = _load_source(source, device, log)
    enable_packed_scoring(model, device)
    return model, tok, desc


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
