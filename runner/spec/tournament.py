"""Job kind `tournament`: teams' question and answer agents play each other under the competition's rules."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runner.spec.models import NAME_RE, At, JobBase, ModelSpec, Section
from runner.spec.serve import PROCEDURAL_TOPICS, AgentSource, AnswerAgentSpec, QuestionAgentSpec


class RemoteAgent(Section):
    url: str | None = Field(None, description="Base URL of a running `serve` job (e.g. http://127.0.0.1:8000).")
    token: str | None = Field(None, description="Bearer token for `url`; use `${env:VAR}`.")


class TeamAnswer(AgentSource, RemoteAgent, AnswerAgentSpec):
    """A team's answer agent: a job-local model, a registry reference, or a served URL."""

    @model_validator(mode="after")
    def _one(self) -> TeamAnswer:
        if self.url is None and not self.has_model():
            raise ValueError("an answer agent needs `model`, `registry` or `url`")
        if self.url is not None and self.has_model():
            raise ValueError("give either `url` or a model (`model`/`registry`), not both")
        return self


class TeamQuestion(AgentSource, RemoteAgent, QuestionAgentSpec):
    """A team's question agent; without a model it can use only the `bank` and `procedural` sources."""

    use_answer_model: bool = Field(
        True, description="Use the team's answer agent to check model-written keys and rank bank questions."
    )

    @model_validator(mode="after")
    def _one(self) -> TeamQuestion:
        if self.url is not None and self.has_model():
            raise ValueError("give either `url` or a model (`model`/`registry`), not both")
        return self


class Team(Section):
    name: str = Field(description="Team name (lowercase letters, digits, `.`, `_`, `-`).")
    answer: TeamAnswer = Field(description="The team's answer agent (A-agent).")
    question: TeamQuestion = Field(default_factory=TeamQuestion, description="The team's question agent (Q-agent).")

    @model_validator(mode="after")
    def _name(self) -> Team:
        if not NAME_RE.fullmatch(self.name):
            raise At("name", f"team name {self.name!r}: use lowercase letters, digits, '.', '_' or '-'")
        return self


class Judge(AgentSource):
    """A model that checks each valid question's key, as the competition's closed judge does."""

    min_confidence: float = Field(
        0.5, ge=0, le=1,
        description="The judge overrules a key only when its own, different answer has at least this probability.",
    )
    permutations: int = Field(
        1, ge=0, le=9, description="Extra passes over cyclic shifts of the choices, averaged (letter debiasing)."
    )

    @model_validator(mode="after")
    def _has_model(self) -> Judge:
        if not self.has_model():
            raise ValueError("a judge needs `model` or `registry`")
        return self


class Rules(Section):
    rounds: int = Field(1, ge=1, description="Times every pair of teams meets (each meeting: two innings).")
    questions_per_innings: int = Field(20, ge=1, description="Questions the Q-agent writes per innings.")
    topics: list[str] = Field(
        default_factory=lambda: list(PROCEDURAL_TOPICS), min_length=1, description="Topics, cycled over the questions."
    )
    question_time_s: float = Field(13.0, gt=0, description="Time limit to write one question.")
    answer_time_s: float = Field(9.0, gt=0, description="Time limit to answer one question.")
    question_tokens: int = Field(130, ge=1, description="question + choices + answer must be under this many tokens.")
    explanation_tokens: int = Field(1024, ge=1, description="question + explanation at most this many tokens.")
    answer_tokens: int = Field(512, ge=1, description="answer + reasoning must be under this many tokens.")
    min_valid_fraction: float = Field(
        0.5, ge=0, le=1, description="A team whose questions are valid less often than this is out."
    )
    tokenizer: ModelSpec | None = Field(
        None, description="Tokenizer that counts tokens; default: the first team's local model's tokenizer."
    )
    judge: Judge | None = Field(
        None, description="A model that invalidates questions whose key it confidently disputes (a wrong key "
        "makes a question invalid); without one, keys are taken as written.",
    )
    seed: int = Field(0, description="Seed for the order of play.")


class TournamentJob(JobBase):
    kind: Literal["tournament"] = Field(description="Teams' agents play each other; writes a scoreboard.")
    teams: list[Team] = Field(min_length=2, description="Two or more teams.")
    rules: Rules = Field(default_factory=Rules, description="Innings size, limits and scoring.")
    device: str = Field("auto", description="Torch device for local models: `auto`, `cpu`, `cuda`, ...")

    @model_validator(mode="after")
    def _unique(self) -> TournamentJob:
        names = [t.name for t in self.teams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise At("teams", f"team names must be unique; repeated: {', '.join(dup)}")
        return self
