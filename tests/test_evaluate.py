"""The eval workload: ensembles, metrics, targets (base model, run checkpoint, registry), and a real eval job
on the shared MMLU val files whose eval.json accuracy matches its own per-question predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.spec import job_from_data
from runner.workloads.data.records import MCQ
from runner.workloads.recipes.eval import EvalError, evaluate
from runner.workloads.scoring.summary import ensemble, summarize, vote_probs

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MMLU_VAL = ROOT.parent / "shared" / "data" / "mmlu" / "val"
TINY = {"base": "tiny", "tiny": {"pretrain_steps": 20, "seed": 0}}


def probs_of(rows: list[list[float]]) -> torch.Tensor:
    out = torch.zeros(len(rows), 10)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def test_ensemble_mean_and_majority_vote():
    a = probs_of([[0.6, 0.4, 0.0], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    b = probs_of([[0.55, 0.45, 0.0], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    c = probs_of([[0.2, 0.8, 0.0], [0.25, 0.7, 0.05], [0.45, 0.25, 0.3]])
    mean, vote = ensemble([a, b, c])
    torch.testing.assert_close(mean, (a + b + c) / 3)
    # q0: votes A, A, B -> A; q1: C, B, B -> B; q2: A, B, A -> A.
    assert vote.tolist() == [0, 1, 0]
    assert mean.argmax(-1).tolist() == [1, 1, 1]  # the mean disagrees with the vote on q0 and q2
    # The vote's letter carries the top probability, so calibration metrics of the vote are about the vote.
    vp = vote_probs(vote, mean)
    assert vp.argmax(-1).tolist() == vote.tolist()
    torch.testing.assert_close(vp.sum(-1), mean.sum(-1))


def test_ensemble_tie_goes_to_higher_mean():
    a = probs_of([[0.9, 0.1]])
    b = probs_of([[0.45, 0.55]])
    _, vote = ensemble([a, b])  # one vote each: A has the higher mean (0.675)
    assert vote.tolist() == [0]


def _mcq(i: int, answer: str, difficulty: str, topic: str = "t") -> MCQ:
    return MCQ(id=f"q{i}", question=f"q{i}?", choices=["a", "b", "c", "d"], answer=answer, topic=topic,
               source="s", difficulty=difficulty)


def test_summarize_breakdowns():
    recs = [_mcq(0, "A", "easy"), _mcq(1, "B", "easy"), _mcq(2, "C", "hard", "u"), _mcq(3, "D", "hard", "u")]
    probs = probs_of([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    s = summarize(recs, probs)
    assert s["n"] == 4 and s["correct"] == 3 and s["accuracy"] == 0.75
    assert s["by_difficulty"] == {"easy": {"n": 2, "accuracy": 0.5}, "hard": {"n": 2, "accuracy": 1.0}}
    assert s["by_topic"]["u"]["accuracy"] == 1.0
    assert s["ece"] == pytest.approx(0.05, abs=1e-6)  # one bin at confidence 0.7 with accuracy 0.75
    lo, hi = s["accuracy_ci95"]
    assert lo < 0.75 < hi


# --- real jobs on the tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data") / "mcq.jsonl"
    rows = []
    for i in range(24):
        k = (2, 4, 5)[i % 3]
        rows.append({"id": f"x{i}", "question": f"Which item number {i} fits the pattern {i * 7 % 13}?",
                     "choices": [f"option {j} for {i}" for j in range(k)], "answer": "ABCDE"[i % k],
                     "topic": ("math", "art")[i % 2], "difficulty": ("easy", "medium", "hard")[i % 3]})
    d.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def spec_of(**kw):
    data = {"kind": "eval", "name": "eval-test", "threads": 1, **kw}
    return job_from_data(data).spec


def _check_consistent(out: dict) -> None:
    preds = out["predictions"]
    assert len(preds) == out["n"]
    assert sum(p["correct"] for p in preds) / len(preds) == pytest.approx(out["accuracy"])
    for p in preds:
        assert p["correct"] == (p["pred"] == p["answer"])
        assert sum(p["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["probs"][p["pred"]] >= max(p["probs"].values()) - 2e-6  # the prediction is a top letter


def test_eval_base_model_with_bias_debias_and_cross_check(runner_home, data_file, tmp_path):
    spec = spec_of(model=TINY, data=[str(data_file)], scoring={"method": "both"},
                   calibration={"letter_bias": True, "debias": True, "bins": 5})
    out = evaluate(spec, tmp_path, log=lambda m: None)
    _check_consistent(out)
    assert out["n"] == 24 and set(out["by_difficulty"]) == {"easy", "medium", "hard"}
    assert set(out["by_topic"]) == {"math", "art"}
    assert out["debias"]["cost"]["passes"] == 5 and out["debias"]["cost"]["questions_scored"] == 8 * (2 + 4 + 5)
    assert set(out["letter_bias"]["accuracy_by_position"]) == set("ABCDE")
    assert 0.0 <= out["cross_check"]["agreement"] <= 1.0
    assert all("plain_probs" in p and "per_choice_pred" in p for p in out["predictions"])
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["accuracy"] == out["accuracy"] and on_disk["eval_set"].startswith("ids-")
    report = (tmp_path / "report.md").read_text()
    assert "reliability.png" in report and "Letter-prior bias" in report and "Permutation debiasing" in report
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["split"] == "eval"


def _fake_training_run(home: Path) -> Path:
    """A finished training run as the trainer leaves it: job.yaml naming the base, a PEFT adapter checkpoint."""
    from peft import LoraConfig, get_peft_model

    from runner.spec.models import ModelSpec
    from runner.workloads.model.loading import load_model_and_tokenizer

    run_dir = home / "runs" / "train-tiny" / "20260101-000000-0001"
    ck = run_dir / "checkpoints" / "step-00000010" / "adapter"
    ck.mkdir(parents=True)
    (run_dir / "job.yaml").write_text(json.dumps({"kind": "train", "name": "train-tiny", "model": TINY}))
    (run_dir / "status.json").write_text(json.dumps({"kind": "train", "state": "succeeded"}))
    base, _ = load_model_and_tokenizer(ModelSpec.model_validate(TINY), "cpu", log=lambda m: None)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    peft.save_pretrained(str(ck))
    (ck.parent / "trainer_state.json").write_text(json.dumps({"step": 10}))  # the trainer's last file
    return run_dir


def test_eval_run_checkpoint_and_ensemble(runner_home, data_file, tmp_path):
    run_dir = _fake_training_run(runner_home)
    one = evaluate(spec_of(run="train-tiny", checkpoint="last", data=[str(data_file)]), tmp_path / "one",
                   log=lambda m: None)
    _check_consistent(one)
    assert one["target"]["type"] == "run" and one["target"]["checkpoint"] == "step-00000010"
    assert one["target"]["checkpoint_path"] == os.path.realpath(run_dir / "checkpoints" / "step-00000010")
    base = evaluate(spec_of(model=TINY, data=[str(data_file)]), tmp_path / "base", log=lambda m: None)
    assert [p["probs"] for p in one["predictions"]] != [p["probs"] for p in base["predictions"]], "adapter ignored"

    ens = evaluate(spec_of(models=[{"model": TINY}, {"run": "train-tiny", "checkpoint": "step-10", "name": "ft"}],
                           ensemble="vote", data=[str(data_file)]), tmp_path / "ens", log=lambda m: None)
    _check_consistent(ens)
    assert [m["label"] for m in ens["members"]] == ["tiny", "ft"]
    assert ens["members"][0]["accuracy"] == base["accuracy"] and ens["members"][1]["accuracy"] == one["accuracy"]
    # Recompute both ensemble rules from the members' own per-question probabilities.
    mean_pred, vote_pred = [p["mean_pred"] for p in ens["predictions"]], [p["vote"] for p in ens["predictions"]]
    assert [p["pred"] for p in ens["predictions"]] == vote_pred
    gold = [p["answer"] for p in ens["predictions"]]
    assert ens["ensemble"]["mean"]["accuracy"] == pytest.approx(sum(m == g for m, g in zip(mean_pred, gold, strict=True)) / 24)
    assert ens["accuracy"] == ens["ensemble"]["vote"]["accuracy"]
    assert "Ensemble members" in (tmp_path / "ens" / "report.md").read_text()


def test_eval_targets_that_do_not_exist_are_clear_errors(runner_home, data_file, tmp_path):
    with pytest.raises(EvalError, match="no run 'nope'"):
        evaluate(spec_of(run="nope", data=[str(data_file)]), tmp_path, log=lambda m: None)
    with pytest.raises(EvalError, match="registry"):
        evaluate(spec_of(registry="nothing@champion", data=[str(data_file)]), tmp_path, log=lambda m: None)
    with pytest.raises(EvalError, match="data"):
        evaluate(spec_of(model=TINY, data=[str(tmp_path / "missing.jsonl")]), tmp_path, log=lambda m: None)


def test_spec_needs_exactly_one_target():
    from runner.spec import SpecError

    with pytest.raises(SpecError, match="exactly one of"):
        job_from_data({"kind": "eval", "name": "e", "data": "x.jsonl"})
    with pytest.raises(SpecError, match="exactly one of"):
        job_from_data({"kind": "eval", "name": "e", "model": {"base": "tiny"}, "registry": "a@b", "data": "x.jsonl"})
    with pytest.raises(SpecError, match="checkpoint"):
        job_from_data({"kind": "eval", "name": "e", "run": "r", "checkpoint": "newest", "data": "x.jsonl"})


@pytest.mark.slow
def test_eval_job_on_mmlu_val_through_the_cli(tmp_path):
    """`runner run` of an eval job on the 1,542 shared MMLU val questions with the tiny model, on CPU."""
    if not MMLU_VAL.is_dir():
        pytest.skip(f"{MMLU_VAL} not present")
    job = tmp_path / "eval-mmlu.yaml"
    job.write_text(
        "kind: eval\nname: eval-mmlu-val\nmodel:\n  base: tiny\n  tiny: {pretrain_steps: 20}\n"
        f"data:\n  - path: {MMLU_VAL}\nthreads: 1\n"
    )
    env = {**os.environ, "RUNNER_HOME": str(tmp_path / "home")}  # RUNNER_CACHE (the tiny base) stays shared
    proc = subprocess.run([sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (ev_path,) = (tmp_path / "home" / "runs" / "eval-mmlu-val").glob("*/eval.json")
    out = json.loads(ev_path.read_text())
    assert out["n"] == 1542
    _check_consistent(out)
    assert sum(v["n"] for v in out["by_topic"].values()) == 1542 and len(out["by_topic"]) == 57
    assert len({p["id"] for p in out["predictions"]}) == 1542
    assert (ev_path.parent / "report.md").is_file() and (ev_path.parent / "reliability.png").is_file()


def test_a_long_eval_reports_done_total_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.workloads.recipes import eval as eval_recipe

    monkeypatch.setattr(eval_recipe, "PROGRESS_EVERY_S", 0.0)
    items = list(range(10))
    calls: list[list[int]] = []

    def fn(chunk: list[int]) -> torch.Tensor:
        calls.append(list(chunk))
        return torch.tensor([[float(i)] for i in chunk])

    lines: list[str] = []
    out = eval_recipe.in_chunks(fn, items, lines.append, "letters", chunk=4)
    assert out.flatten().tolist() == [float(i) for i in items]  # in order, nothing lost or repeated
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [ln.split(",")[0] for ln in lines] == ["  letters: 4/10 questions", "  letters: 8/10 questions"]
    assert all(" q/s, ETA " in ln and ln.endswith(" s") for ln in lines)
    lines.clear()
    eval_recipe.in_chunks(fn, items, lines.append, "letters", chunk=10)  # fits: one call, nothing to report
    assert lines == [] and calls[-1] == items
