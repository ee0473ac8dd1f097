"""Job kind `serve`: the answer and question agents behind an HTTP service, and the agent settings it shares
with the tournament."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from runner.spec.engines import ENGINE_DESCRIPTION, EngineName, LlamaCppSpec, VllmSpec
from runner.spec.models import PROMPT_DESCRIPTION, At, DataSource, JobBase, ModelSpec, PromptSpec, Section

PROCEDURAL_TOPICS = ["seating_linear", "seating_circular", "blood_relations", "syllogisms", "alphanumeric_series"]
QuestionSource = Literal["bank", "procedural", "model"]


class AgentSource(Section):
    """Where an agent's weights come from. With both `registry` and `model`, the registry version is used
    when it exists and the job-local model otherwise (so a job works before anything is promoted)."""

    model: ModelSpec | None = Field(None, description="A job-local base model (`tiny`, a local directory or a Hub id).")
    adapter: str | None = Field(
        None,
        description="LoRA adapter on top of `model`: an adapter directory, a checkpoint directory, or a run "
        "directory (its latest checkpoint).",
    )
    registry: str | None = Field(None, description="A promoted artifact: `NAME@alias` or `NAME:vN`.")
    prompt: PromptSpec | None = Field(None, description=PROMPT_DESCRIPTION)
    engine: EngineName = Field("builtin", description=ENGINE_DESCRIPTION)
    vllm: VllmSpec = Field(default_factory=VllmSpec, description="`engine: vllm`: the `vllm serve` flags.")
    llamacpp: LlamaCppSpec = Field(default_factory=LlamaCppSpec, description="`engine: llamacpp`: the GGUF and its runtime.")

    @model_validator(mode="after")
    def _some_source(self) -> AgentSource:
        if self.adapter is not None and self.model is None:
            raise At("adapter", "`adapter` needs `model` (the base it was trained on)")
        if self.engine == "llamacpp" and not self.llamacpp.gguf.endswith(".gguf") and self.registry is None:
            raise At("llamacpp", f"engine llamacpp with gguf: {self.llamacpp.gguf} reads that GGUF from a registry "
                     "version: set `registry` (promoted with `runner promote ... --gguf "
                     f"{self.llamacpp.gguf}`) or give llamacpp.gguf a path to a .gguf file")
        return self

    def has_model(self) -> bool:
        return self.model is not None or self.registry is not None


class AnswerAgentSpec(Section):
    permutations: int = Field(
        0, ge=0, le=9, description="Extra passes over cyclic shifts of the choices, averaged (letter debiasing)."
    )
    deadline_s: float = Field(6.0, gt=0, description="Time per answer; when it runs short, answer with the passes done.")
    batch_size: int = Field(32, ge=1, description="Questions per forward pass.")
    reasoning: bool | Literal["model"] = Field(
        True, description="Each answer's reasoning: `true`, a fixed sentence naming the choice and its probability; "
        "`false`, none; `model`, the model explains the chosen answer in a sentence or two (greedy, within what is "
        "left of the deadline and the format limits; the fixed sentence when there is no time or no usable text).",
    )
    cuda_graphs: bool = Field(
        True, description="Serving on a GPU: record the scoring forward for small batches as CUDA graphs at start-up "
        "(a served question's forward is bound by kernel launches; a graph replays them in one)."
    )

    @field_validator("reasoning", mode="before")
    @classmethod
    def _reasoning(cls, v: object) -> object:
        if isinstance(v, bool) or v == "model":
            return v
        raise ValueError(f"reasoning {v!r}: use true (a fixed sentence), false (no reasoning) or model (the model "
                         "explains the chosen answer)")


class QuestionAgentSpec(Section):
    topics: list[str] = Field(
        default_factory=lambda: list(PROCEDURAL_TOPICS), min_length=1, description="Topics the agent writes."
    )
    sources: dict[QuestionSource, float] = Field(
        default_factory=lambda: {"procedural": 1.0},  # type: ignore[arg-type,dict-item]
        description="Weight of each question source: `bank` (an MCQ file), `procedural` (generated logic "
        "puzzles with verified keys), `model` (written by the LLM, kept only if the answer agent agrees).",
    )
    per_topic: dict[str, dict[QuestionSource, float]] = Field(
        default_factory=dict, description="Source weights for particular topics (overrides `sources`)."
    )
    bank: list[DataSource] = Field(default_factory=list, description="MCQ sources for the `bank` source.")
    prefer_hard: bool = Field(True, description="Use bank questions the own answer agent finds hardest first.")
    time_limit_s: float = Field(10.0, gt=0, description="Time to write one question.")
    seed: int = Field(0, description="Seed for choosing sources, puzzles and bank questions.")

    @field_validator("bank", mode="before")
    @classmethod
    def _bank(cls, v: object) -> object:
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("sources")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError("weights must be >= 0 with at least one > 0, e.g. {procedural: 1.0}")
        return v


class ServerSpec(Section):
    host: str = Field("127.0.0.1", description="Address to listen on; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one (written to serve.json).")
    token: str | None = Field(
        None, description="Bearer token clients must send; write `${env:QA_TOKEN}` to keep it out of the file."
    )
    max_batch: int = Field(32, ge=1, description="Most questions answered in one forward pass.")
    batch_window_ms: float = Field(
        4.0, ge=0, description="How long the first queued request waits for others to share its forward pass."
    )
    queue_size: int = Field(256, ge=1, description="Requests waiting at most; beyond it the service answers 503.")
    max_prompt_tokens: int = Field(
        2048, ge=64, description="Longest question + choices prompt answered (tokens); longer ones get 422."
    )
    max_body_mb: float = Field(4.0, gt=0, description="Largest request body (MiB); larger ones get 413.")
    max_seconds: float | None = Field(None, gt=0, description="Stop serving after this long (tests, demos).")


class ServeJob(JobBase, AgentSource):
    kind: Literal["serve"] = Field(description="Serve the answer and question agents over HTTP.")
    server: ServerSpec = Field(default_factory=ServerSpec, description="Listening address, auth, batching, queue.")
    answer: AnswerAgentSpec = Field(default_factory=AnswerAgentSpec, description="Answer agent settings.")
    question: QuestionAgentSpec = Field(default_factory=QuestionAgentSpec, description="Question agent settings.")
    ensemble: list[AgentSource] = Field(
        default_factory=list, description="More models whose letter probabilities are averaged with the main one."
    )
    device: str = Field("auto", description="Torch device: `auto` (a GPU when there is one), `cpu`, `cuda`, ...")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (CPU serving); default: torch's.")

    @model_validator(mode="after")
    def _needs_model(self) -> ServeJob:
        if not self.has_model():
            raise ValueError("a serve job needs `model` (e.g. {base: tiny}) or `registry` (e.g. qa-agent@champion)")
        if self.engine == "llamacpp" and self.backend != "local":
            raise At("engine", f"engine llamacpp runs on the local backend only (no image ships llama-cpp-python); "
                     f"this job has backend {self.backend}: use backend: local, or engine vllm / builtin")
        return self

    @field_validator("server")
    @classmethod
    def _reachable_on_kubernetes(cls, server: ServerSpec, info: ValidationInfo) -> ServerSpec:
        if info.data.get("backend") != "kubernetes":
            return server
        if server.port == 0:
            raise At("port", "port 0 (any free port) cannot work on Kubernetes: its probes and clients need "
                             "a fixed port; set server.port, e.g. 8000")
        if server.host in ("127.0.0.1", "localhost", "::1"):
            raise At("host", f"host {server.host} is reachable only inside the pod on Kubernetes, not by "
                             "its probes or clients; set server.host: 0.0.0.0 (and server.token)")
        return server
