"""McNemar on known tables, and `runner compare` on run directories as an eval job and a trainer leave them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runner.compare import compare_main, paired_tests, resolve
from runner.stats import mcnemar, paired_mcnemar, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def test_mcnemar_exact_small_table():
    # 1 vs 9 discordant pairs: 2 * P(X <= 1 | n=10, p=1/2) = 2 * 11 / 1024.
    assert mcnemar(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar(5, 5) == 1.0 and mcnemar(0, 0) == 1.0
    assert mcnemar(0, 6, "exact") == pytest.approx(2 / 64)


def test_mcnemar_chi_square_known_table():
    # Agresti's approval-rating table: discordant 150 / 86.
    assert mcnemar(150, 86, "chi2") == pytest.approx(math.erfc(math.sqrt(64**2 / 236 / 2)))
    assert mcnemar(150, 86, "chi2") == pytest.approx(3.1e-5, rel=0.05)  # chi2 = 17.36
    assert mcnemar(150, 86, "chi2_cc") == pytest.approx(4.1e-5, rel=0.05)  # chi2 = 16.82
    assert mcnemar(150, 86) == mcnemar(150, 86, "chi2_cc")  # auto: >= 25 discordant pairs
    # The exact test stays finite and close to the chi-square for large counts.
    assert mcnemar(600, 500, "exact") == pytest.approx(mcnemar(600, 500, "chi2_cc"), rel=0.05)


def test_paired_counts_on_shared_ids_only():
    a = {"q1": True, "q2": True, "q3": False, "q4": False, "only-a": True}
    b = {"q1": True, "q2": False, "q3": True, "q4": True, "only-b": False}
    r = paired_mcnemar(a, b)
    assert (r.n, r.both_right, r.only_first, r.only_second, r.both_wrong) == (4, 1, 1, 2, 0)
    assert r.accuracy_first == 0.5 and r.accuracy_second == 0.75 and r.method == "exact"
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def _eval_run(home: Path, job: str, rid: str, correct: list[bool], by_diff: dict[str, float], ece: float) -> Path:
    d = home / "runs" / job / rid
    d.mkdir(parents=True)
    preds = [{"id": f"q{i}", "answer": "A", "pred": "A" if c else "B", "correct": c} for i, c in enumerate(correct)]
    ev = {"label": job, "n": len(correct), "accuracy": sum(correct) / len(correct), "ece": ece,
          "by_difficulty": {k: {"n": 10, "accuracy": v} for k, v in by_diff.items()}, "predictions": preds}
    (d / "eval.json").write_text(json.dumps(ev))
    (d / "status.json").write_text(json.dumps({"kind": "eval", "state": "succeeded"}))
    return d


def _train_run(home: Path) -> Path:
    d = home / "runs" / "train-a" / "20260101-000000-0001"
    d.mkdir(parents=True)
    lines = [{"step": s, "split": "train", "loss": 1.0 / s, "tokens_seen": 4096 * s} for s in (10, 20, 30)]
    lines += [{"step": 30, "split": "val", "accuracy": 0.61, "n": 200}, {"step": 20, "split": "val", "accuracy": 0.64}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 4')  # a cut line
    (d / "status.json").write_text(json.dumps({"kind": "train", "state": "succeeded"}))
    return d


def test_compare_two_evals_and_a_training_run(runner_home, tmp_path, capsys):
    base = [True] * 60 + [False] * 40
    cand = [True] * 60 + [False] * 40
    for i in range(60, 75):  # the candidate fixes 15 questions and breaks 2: +13 points, p < 0.01
        cand[i] = True
    cand[0] = cand[1] = False
    a = _eval_run(runner_home, "eval-base", "20260101-000000-0001", base, {"easy": 0.8, "hard": 0.4}, 0.05)
    _eval_run(runner_home, "eval-ft", "20260101-000000-0002", cand, {"easy": 0.9, "medium": 0.7}, 0.03)
    _train_run(runner_home)
    png = tmp_path / "cmp.png"
    assert compare_main([str(a), "eval-ft", "train-a"], str(png)) == 0
    out = capsys.readouterr().out
    assert "eval-base/20260101-000000-0001" in out and "eval-ft/20260101-000000-0002" in out
    assert "60.00" in out and "73.00" in out and "80.00" in out and "90.00" in out
    assert "122.9k" in out  # tokens seen by the training run
    assert "+13.00 points" in out and "significant" in out and "not significant" not in out
    assert png.read_bytes()[:4] == b"\x89PNG"

    entries = [resolve(str(a)), resolve("eval-ft")]
    (t,) = paired_tests(entries)
    assert (t["n"], t["only_first"], t["only_second"]) == (100, 2, 15)
    assert t["p_value"] == pytest.approx(mcnemar(2, 15)) and t["p_value"] < 0.01
    train = resolve("train-a")
    assert train.accuracy == 0.64 and train.best_val == 0.64 and train.tokens_seen == 4096 * 30


def test_compare_small_difference_is_not_significant(runner_home, tmp_path, capsys):
    base = [i % 2 == 0 for i in range(400)]
    cand = list(base)
    for i in (1, 3, 5, 7, 9):  # +5 right, -2 right: +0.75 points on 400 questions
        cand[i] = True
    cand[0] = cand[2] = False
    _eval_run(runner_home, "e1", "r1", base, {}, 0.1)
    _eval_run(runner_home, "e2", "r2", cand, {}, 0.1)
    assert compare_main(["e1", "e2"], str(tmp_path / "c.png")) == 0
    out = capsys.readouterr().out
    assert "+0.75 points" in out and "not significant" in out


def test_compare_errors_are_one_line(runner_home, tmp_path, capsys):
    assert compare_main(["no-such-run"], None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run 'no-such-run'") and "Traceback" not in err
    bad = tmp_path / "eval.json"
    bad.write_text('{"accuracy": 0.5')
    assert compare_main([str(bad)], None) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_compare_cli_does_not_import_torch(runner_home, tmp_path):
    _eval_run(runner_home, "e1", "r1", [True, False, True], {}, 0.1)
    code = ("import sys; from runner.cli import main; sys.argv=['runner','compare','e1','--png',sys.argv[1]]\n"
            "try:\n main()\nexcept SystemExit as e:\n assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "'torch imported'\n raise")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "e1/r1" in p.stdout
