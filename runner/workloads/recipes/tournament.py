"""Tournament (job kind `tournament`): every team's question agent plays every other team's answer agent.

Per innings the Q-agent of team X writes N questions (topics in turn) and the A-agent of team Y answers the
valid ones; then the roles swap. Rules (DESIGN.md, "The tournament"): the format filter and the time limits
decide validity; A-score = % of faced questions answered correctly; Q-score = % of a team's valid questions
the opponent got wrong; a team with fewer valid questions than `min_valid_fraction` is out. The ranking
score is the mean of the two (disqualified teams rank last). Writes tournament.json and report.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from runner.files import atomic_write
from runner.workloads.agents.answer import AnswerAgent
from runner.workloads.agents.format_filter import FormatLimits, TokenCounter, approx_token_count
from runner.workloads.agents.match import (
    AnswerPlayer,
    HttpAnswerPlayer,
    HttpQuestionPlayer,
    KeyJudge,
    LocalAnswerPlayer,
    LocalQuestionPlayer,
    QuestionPlayer,
    RulesConfig,
    TeamPlayers,
    _fmt,
    play,
    report_md,
)

# --- players ---------------------------------------------------------------------------------------------


# --- play ------------------------------------------------------------------------------------------------


# --- report --------------------------------------------------------------------------------------------------


# --- the job ----------------------------------------------------------------------------------------------------


def _source_key(src: Any) -> str:
    return json.dumps({k: src.model_dump(mode="json").get(k) for k in ("model", "adapter", "registry")}, sort_keys=True)


def build_teams(
    spec: Any, log: Any = print
) -> tuple[list[TeamPlayers], TokenCounter, dict[str, str], KeyJudge | None]:
    """Players for every team and the judge (a model named more than once is loaded once), the token counter."""
    from runner.workloads.agents.format_filter import token_counter
    from runner.workloads.agents.sources import (
        load_source,
        pick_device,
        question_agent_from_spec,
        resolve_token,
    )

    device = pick_device(spec.device)
    loaded: dict[str, tuple[Any, Any, str]] = {}

    def load(src: Any) -> tuple[Any, Any, str]:
        key = _source_key(src)
        if key not in loaded:
            loaded[key] = load_source(src, device, log)
        return loaded[key]

    counter: TokenCounter | None = None
    if spec.rules.tokenizer is not None:
        from transformers import AutoTokenizer

        from runner.workloads.model.loading import base_model_path

        counter = token_counter(AutoTokenizer.from_pretrained(base_model_path(spec.rules.tokenizer, log=log)))
    models: dict[str, str] = {}
    answer_agents: dict[str, AnswerAgent] = {}
    for team in spec.teams:
        a = team.answer
        if a.url is None:
            m, tok, desc = load(a)
            models[f"{team.name}/answer"] = desc
            if counter is None:
                counter = token_counter(tok)
            answer_agents[team.name] = AnswerAgent([(m, tok)], permutations=a.permutations,
                                                   deadline_s=min(a.deadline_s, spec.rules.answer_time_s),
                                                   batch_size=a.batch_size, reasoning=a.reasoning,
                                                   prompt=a.prompt)
        else:
            models[f"{team.name}/answer"] = a.url
    count = counter or approx_token_count
    teams = []
    for team in spec.teams:
        a, q = team.answer, team.question
        aplayer: AnswerPlayer = (HttpAnswerPlayer(a.url, resolve_token(a.token)) if a.url is not None
                                 else LocalAnswerPlayer(answer_agents[team.name]))
        qplayer: QuestionPlayer
        if q.url is not None:
            qplayer = HttpQuestionPlayer(q.url, resolve_token(q.token))
            models[f"{team.name}/question"] = q.url
        else:
            writer = None
            if q.has_model():
                m, tok, desc = load(q)
                writer = (m, tok)
                models[f"{team.name}/question"] = desc
            else:
                models[f"{team.name}/question"] = "+".join(s for s, w in q.sources.items() if w > 0)
            checker = answer_agents.get(team.name) if q.use_answer_model else None
            agent = question_agent_from_spec(q, checker, writer, count)
            agent.time_limit_s = min(q.time_limit_s, spec.rules.question_time_s)
            qplayer = LocalQuestionPlayer(agent)
        teams.append(TeamPlayers(team.name, aplayer, qplayer))
    judge = None
    if spec.rules.judge is not None:
        j = spec.rules.judge
        m, tok, models["judge"] = load(j)
        judge = KeyJudge(AnswerAgent([(m, tok)], permutations=j.permutations, prompt=j.prompt), j.min_confidence)
    return teams, count, models, judge


def run(job: Any, run_dir: Path) -> int:
    spec = job.spec
    r = spec.rules
    t0 = time.monotonic()
    try:
        teams, count, models, judge = build_teams(spec)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", flush=True)
        return 1
    rules = RulesConfig(
        rounds=r.rounds, questions_per_innings=r.questions_per_innings, topics=list(r.topics),
        question_time_s=r.question_time_s, answer_time_s=r.answer_time_s, min_valid_fraction=r.min_valid_fraction,
        limits=FormatLimits(question_tokens=r.question_tokens, explanation_tokens=r.explanation_tokens,
                            answer_tokens=r.answer_tokens),
        seed=r.seed, judge=judge,
    )
    if judge is not None:
        print(f"judge: {models['judge']} (overrules a key at >= {judge.min_confidence:.0%})", flush=True)
    print(f"{len(teams)} teams, {r.rounds} round(s), {r.questions_per_innings} questions per innings, "
          f"topics: {', '.join(r.topics)}", flush=True)
    result = play(teams, rules, count, log=lambda m: print(m, flush=True))
    result["min_valid_fraction"] = r.min_valid_fraction
    result["models"] = models
    result["seconds"] = round(time.monotonic() - t0, 1)
    # how each local Q-agent's sources fared, the writer model's parse / format / key counts among them
    result["question_agents"] = {t.name: t.question.agent.stats.as_dict() for t in teams
                                 if isinstance(t.question, LocalQuestionPlayer)}
    atomic_write(run_dir / "tournament.json", json.dumps(result, indent=2) + "\n")
    atomic_write(run_dir / "report.md", report_md(result, job.name))
    for t in result["ranking"]:
        b = result["teams"][t]
        print(f"#{b['rank']} {t}: score {b['score']:.1f}  A {_fmt(b['answer_score'])}  Q {_fmt(b['question_score'])}  "
              f"valid {b['valid']}/{b['written']}{'  OUT' if b['disqualified'] else ''}", flush=True)
    print(f"scoreboard: {run_dir / 'tournament.json'}, report: {run_dir / 'report.md'}", flush=True)
    return 0
