"""Every job kind on the real `smollm2-135m` base: an exact resume of a killed train job, eval in each prompt
style, the serve job against the in-process scorer, the starter-kit file commands and a two-team tournament.

The first test that needs the model builds it into the shared test cache (`just real-model` does it ahead of time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import MMLU, ROOT, run_cli
from tests.train_helpers import metrics, run_train, start_train, tiny_job, write_run_dir

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEST_CACHE = Path(os.environ.get("RUNNER_TEST_CACHE", str(ROOT / ".runner" / "cache")))
STYLES = ("plain", "mmlu", "chat")
SHORT_TOPICS = ("world_religions", "management", "miscellaneous", "conceptual_physics")  # short MMLU questions
needs_mmlu = pytest.mark.skipif(not MMLU.is_dir(), reason=f"{MMLU} not present")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from runner.workloads.model.smollm2 import ensure_smollm2

    return ensure_smollm2(TEST_CACHE)


@pytest.fixture(scope="module")
def scorer(smollm2: Path) -> tuple[Any, Any]:
    """The model and tokenizer loaded as the service and the agent commands load them (packed scoring on)."""
    from runner.spec.models import ModelSpec
    from runner.spec.serve import AgentSource
    from runner.workloads.agents.sources import load_source

    torch.set_num_threads(2)
    model, tok, _ = load_source(AgentSource(model=ModelSpec(base=str(smollm2))), "cpu", log=lambda m: None)
    return model, tok


@pytest.fixture(scope="module")
def mmlu_val() -> dict[str, Any]:
    """The MMLU validation records by id."""
    from runner.spec.models import DataSource
    from runner.workloads.data.sets import load_sources

    recs = load_sources([DataSource(path=str(MMLU / "val"), format="mmlu_csv")], base_dir=ROOT)
    return {r.id: r for r in recs}


def train_short_smollm2(root: Path, name: str) -> dict[str, str]:
    """A 3-step LoRA (r 8) run of smollm2-135m on MMLU dev through `runner run`, with validation and a checkpoint
    at its last step, in a RUNNER_HOME of its own under `root`; returns that environment."""
    env = {"RUNNER_HOME": str(root / "home"), "RUNNER_CACHE": str(TEST_CACHE)}
    job = root / f"{name}.yaml"
    job.write_text(
        f"kind: train\nname: {name}\nmodel:\n  base: smollm2-135m\nlora:\n  r: 8\n  alpha: 16\n"
        f"data:\n  train:\n    - {{path: {MMLU / 'dev'}, format: mmlu_csv}}\n  val_fraction: 0.1\n  val_limit: 6\n"
        "train:\n  steps: 3\n  batch_size: 2\n  max_seq_len: 160\n  lr: 3.0e-3\n  warmup_steps: 0\n"
        "  eval_every: 3\n  save_every: 3\n  log_every: 1\n  threads: 2\n"
    )
    p = run_cli("run", str(job), env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return env


def _short_questions(records: dict[str, Any], n: int) -> list[Any]:
    """The `n` shortest 4-choice questions (fast to score), in a fixed order."""
    four = [r for r in records.values() if len(r.choices) == 4]
    return sorted(four, key=lambda r: (len(r.question) + sum(len(c) for c in r.choices), r.id))[:n]


def _out(p: subprocess.CompletedProcess[str]) -> str:
    return p.stdout[-3000:] + p.stderr[-3000:]


# --- train: kill -9, then an exact resume ---------------------------------------------------------------


def _smollm2_train_job() -> dict[str, Any]:
    job = tiny_job(
        "train-smollm2-resume",
        data={"train": [{"path": "builtin:categories", "topics": ["tools", "clothing"], "limit": 40}],
              "val_fraction": 0.2, "val_limit": 8},
        train={"steps": 6, "batch_size": 1, "max_seq_len": 96, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3,
               "save_every": 2, "log_every": 1, "threads": 2, "deterministic": True},
    )
    job["model"] = {"base": "smollm2-135m"}
    return job


def test_kill9_then_resume_gives_identical_losses(smollm2: Path, tmp_path: Path) -> None:
    full = write_run_dir(tmp_path / "full", _smollm2_train_job())
    rc, out = run_train(full, TEST_CACHE)
    assert rc == 0, out[-3000:]
    run_dir = write_run_dir(tmp_path / "killed", _smollm2_train_job())
    proc = start_train(run_dir, TEST_CACHE)
    ck = run_dir / "checkpoints" / "step-00000002"
    t0 = time.time()
    while not ck.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.time() - t0 < 300, f"{ck} never appeared"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    rc, out = run_train(run_dir, TEST_CACHE)
    assert rc == 0, out[-3000:]
    assert "resuming from step " in out, out[-3000:]
    assert int(out.split("resuming from step ")[1].split()[0]) >= 2
    want = {r["step"]: r["loss"] for r in metrics(full, "train")}
    got = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
    assert sorted(got) == sorted(want) == list(range(1, 7))  # no duplicated or missing lines after the resume
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"\nsmollm2-135m resume: largest train-loss difference {diff:.2e}")
    assert diff <= 1e-5, {s: (got[s], want[s]) for s in want}
    val = {r["step"]: r["accuracy"] for r in metrics(run_dir, "val")}
    assert sorted(val) == [0, 3, 6] and val == {r["step"]: r["accuracy"] for r in metrics(full, "val")}


# --- eval in the three prompt styles ---------------------------------------------------------------------


def _eval_job(path: Path, name: str, prompt: str) -> Path:
    path.write_text(
        f"kind: eval\nname: {name}\nmodel:\n  base: smollm2-135m\n"
        f"data:\n  - path: {MMLU / 'val'}\n    format: mmlu_csv\n    topics: [{', '.join(SHORT_TOPICS)}]\n"
        f"limit: 12\nprompt: {prompt}\ndevice: cpu\nthreads: 2\n"
    )
    return path


@pytest.fixture(scope="module")
def evals(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """eval.json of one eval job per prompt style."""
    tmp = tmp_path_factory.mktemp("evals")
    env = {"RUNNER_HOME": str(tmp / "home"), "RUNNER_CACHE": str(TEST_CACHE)}
    out = {}
    for style in STYLES:
        job = _eval_job(tmp / f"eval-{style}.yaml", f"eval-smollm2-{style}", f"{{style: {style}}}")
        p = run_cli("run", str(job), env=env, timeout=600)
        assert p.returncode == 0, _out(p)
        (path,) = (tmp / "home" / "runs" / f"eval-smollm2-{style}").glob("*/eval.json")
        out[style] = json.loads(path.read_text())
    return out


@needs_mmlu
def test_eval_records_each_prompt_style_and_scores_its_own_text(evals: dict[str, dict[str, Any]],
                                                                scorer: tuple[Any, Any],
                                                                mmlu_val: dict[str, Any]) -> None:
    from runner.workloads.scoring.prompts import LETTERS, PromptStyle
    from runner.workloads.scoring.scorer import score_mcq

    model, tok = scorer
    ids = [p["id"] for p in evals["plain"]["predictions"]]
    records = [mmlu_val[i] for i in ids]
    for style, ev in evals.items():
        assert ev["target"]["prompt"] == {"style": style} and ev["target"]["base"] == "smollm2-135m"
        assert ev["n"] == 12 and [p["id"] for p in ev["predictions"]] == ids  # the same questions
        for p, r in zip(ev["predictions"], records, strict=True):
            assert p["pred"] in LETTERS[: len(r.choices)] and p["answer"] == r.answer
            assert set(p["probs"]) == set(LETTERS[: len(r.choices)]) and abs(sum(p["probs"].values()) - 1) < 1e-4
            assert p["pred"] == max(p["probs"], key=p["probs"].get) and p["correct"] == (p["pred"] == p["answer"])
        # What the eval scored is the named style's text: the in-process scorer on that style agrees.
        ref = score_mcq(model, tok, records[:4], prompt=PromptStyle(style))
        diff = max(abs(p["probs"][L] - float(ref[i, j])) for i, p in enumerate(ev["predictions"][:4])
                   for j, L in enumerate(p["probs"]))
        assert diff < 1e-3, (style, diff)
    # ... and the styles differ: each pair of styles gives different probabilities.
    for a, b in (("plain", "mmlu"), ("mmlu", "chat"), ("plain", "chat")):
        gap = max(abs(pa["probs"][L] - pb["probs"][L]) for pa, pb in
                  zip(evals[a]["predictions"], evals[b]["predictions"], strict=True) for L in pa["probs"])
        assert gap > 1e-2, (a, b, gap)
    print("\n" + ", ".join(f"{s}: {evals[s]['accuracy']:.0%}" for s in STYLES))


@pytest.mark.parametrize("style", ["plain", "mmlu"])
def test_a_system_turn_outside_the_chat_style_is_refused(style: str, tmp_path: Path) -> None:
    job = _eval_job(tmp_path / "eval.yaml", "eval-smollm2-system", f"{{style: {style}, system: Be brief.}}")
    p = run_cli("run", str(job), timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    assert "prompt.system" in out and f"`system` is used only by `style: chat` (this prompt has style {style})" in out


# --- the service equals the eval scorer ------------------------------------------------------------------


@needs_mmlu
def test_the_serve_job_answers_as_the_scorer_does(scorer: tuple[Any, Any], mmlu_val: dict[str, Any],
                                                  tmp_path: Path) -> None:
    from runner.workloads.agents.answer import AnswerItem
    from runner.workloads.agents.format_filter import check_answer, token_counter
    from runner.workloads.scoring.prompts import LETTERS, PromptStyle, strip_choice_prefix
    from runner.workloads.scoring.scorer import score_mcq

    model, tok = scorer
    questions = _short_questions(mmlu_val, 8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(
        "kind: serve\nname: serve-smollm2\nmodel:\n  base: smollm2-135m\nprompt: {style: chat}\ndevice: cpu\n"
        "threads: 2\nserver: {host: 127.0.0.1, port: 0, max_seconds: 600}\n"
        "answer: {permutations: 0, deadline_s: 60}\nquestion: {sources: {procedural: 1.0}}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "runner.workloads"], cwd=ROOT, text=True,
                            env=dict(os.environ, RUNNER_RUN_DIR=str(run_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if (run_dir / "serve.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert (run_dir / "serve.json").exists(), proc.stdout.read() if proc.stdout else ""
        url = json.loads((run_dir / "serve.json").read_text())["url"]
        for _ in range(100):
            try:
                assert httpx.get(f"{url}/healthz").json()["model"] == "smollm2-135m"
                break
            except httpx.TransportError:
                time.sleep(0.1)
        answers = []
        for r in questions:
            resp = httpx.post(f"{url}/v1/answer", json={"question": r.question, "choices": r.choices}, timeout=120)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
        proc.terminate()
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    # The service's default: no permutations, the job's prompt style, items as the request gave them.
    items = [AnswerItem(r.question.strip(), [strip_choice_prefix(c) for c in r.choices]) for r in questions]
    ref = score_mcq(model, tok, items, prompt=PromptStyle("chat"))
    plain = score_mcq(model, tok, items)
    count = token_counter(tok)
    for i, a in enumerate(answers):
        assert check_answer(a, 4, count) == [] and "is the most likely choice" in a["reasoning"], a
        best = int(ref[i, :4].argmax())
        assert a["answer"] == LETTERS[best], (i, a, ref[i, :4].tolist())
        assert abs(a["confidence"] - float(ref[i, best])) < 1e-3, (i, a, ref[i, :4].tolist())
    # The style reached the service: plain-style confidences are not what it returned.
    assert max(abs(a["confidence"] - float(plain[i, LETTERS.index(a["answer"])])) for i, a in enumerate(answers)) > 1e-2


# --- the starter-kit file commands -----------------------------------------------------------------------


def test_starter_kit_file_commands_on_the_real_model(smollm2: Path, scorer: tuple[Any, Any], tmp_path: Path) -> None:
    from runner.workloads.agents.answer import parse_answer_request
    from runner.workloads.agents.format_filter import check_answer, check_question, token_counter
    from runner.workloads.scoring.prompts import LETTERS
    from runner.workloads.scoring.scorer import score_mcq

    model, tok = scorer
    qfile, afile = tmp_path / "q.json", tmp_path / "a.json"
    p = subprocess.run([sys.executable, "-m", "agents.question_agent", "--num_questions", "6", "--no_model",
                        "--output_file", str(qfile)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    qs = json.loads(qfile.read_text())
    assert len(qs) == 6 and all(check_question(q) == [] for q in qs)
    p = subprocess.run([sys.executable, "-m", "agents.answer_agent", "--input_file", str(qfile), "--output_file",
                        str(afile), "--model", str(smollm2), "--device", "cpu", "--deadline_s", "30"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    answers = json.loads(afile.read_text())
    count = token_counter(tok)
    assert len(answers) == 6 and all(check_answer(a, len(q["choices"]), count) == [] for a, q in zip(answers, qs,
                                                                                                   strict=True))
    assert all("is the most likely choice" in a["reasoning"] for a in answers), answers  # scored, not a fallback
    # answer_agent: no permutations and the plain style (a base model with no adapter); its letters are the scorer's.
    items = [parse_answer_request(q) for q in qs]
    ref = score_mcq(model, tok, items)
    for i, (a, it) in enumerate(zip(answers, items, strict=True)):
        k = len(it.choices)
        best = int(ref[i, :k].argmax())
        assert a["answer"] == LETTERS[best] and abs(a["confidence"] - float(ref[i, best])) < 1e-3, (i, a, ref[i, :k])


# --- a tournament between two real-model teams -----------------------------------------------------------


def test_a_tournament_between_two_smollm2_teams(smollm2: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(
        "kind: tournament\nname: tournament-smollm2\ndevice: cpu\n"
        "rules:\n  rounds: 1\n  questions_per_innings: 6\n"
        "  topics: [seating_linear, blood_relations, syllogisms, alphanumeric_series]\n"
        "teams:\n"
        "  - name: debiased\n    answer: {model: {base: smollm2-135m}, permutations: 1}\n"
        "    question: {sources: {procedural: 1.0}}\n"
        "  - name: plain\n    answer: {model: {base: smollm2-135m}, permutations: 0}\n"
        "    question: {sources: {procedural: 1.0}}\n"
    )
    p = subprocess.run([sys.executable, "-m", "runner.workloads"], env=dict(os.environ, RUNNER_RUN_DIR=str(run_dir)),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, _out(p)
    board = json.loads((run_dir / "tournament.json").read_text())
    assert set(board["teams"]) == {"debiased", "plain"}
    for b in board["teams"].values():
        assert b["written"] > 0 and b["answer_score"] is not None
        assert b["valid_fraction"] >= 0.5
    records = [r for i in board["innings"] for r in i["questions"]]
    assert len(records) == 12
    assert (run_dir / "report.md").read_text().startswith("# Tournament")
