"""The promotion gate: a candidate against the alias holder on an eval set both were measured on, with
McNemar's paired test (runner.stats) when both have per-question results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.registry.evidence import Eval, load_json, predictions_of
from runner.registry.store import EXIT_REFUSED, RegistryError
from runner.stats import paired_mcnemar


def paired_test(cand: dict[str, bool], holder: dict[str, bool]) -> dict[str, Any] | None:
    """McNemar's test on the questions both were scored on (runner.stats); None when they share none."""
    t = paired_mcnemar(cand, holder)
    if t.n == 0:
        return None
    return {"test": "mcnemar", "n": t.n, "candidate_only_correct": t.only_first, "holder_only_correct": t.only_second,
            "p_value": round(t.p_value, 6), "candidate_accuracy": t.accuracy_first,
            "holder_accuracy": t.accuracy_second}


def _holder_correct(vdir: Path, rec: dict[str, Any]) -> dict[str, bool] | None:
    pf = rec.get("predictions_file")
    if not pf:
        return None
    return predictions_of(load_json(vdir / pf))


def gate(cands: list[Eval], holder_vdir: Path, holder_manifest: dict[str, Any]) -> dict[str, Any]:
    """Compare the candidate with the alias holder on an eval set both were measured on.

    Returns the gate record: `passed`, the pair of accuracies, the eval set and the paired test (or why none).
    Raises RegistryError naming the command to run when they share no eval set.
    """
    held = [e for e in holder_manifest.get("evals", []) if isinstance(e, dict)]
    pairs = [(c, h) for c in cands for h in held if c.eval_set == h.get("eval_set")]
    if not pairs:
        raise RegistryError(
            "candidate and holder were never evaluated on the same questions: candidate has "
            f"[{', '.join(f'{c.eval_set} ({c.kind})' for c in cands) or 'none'}], holder has "
            f"[{', '.join(str(h.get('eval_set')) for h in held) or 'none'}]", EXIT_REFUSED)

    def rank(p: tuple[Eval, dict[str, Any]]) -> tuple[int, int]:
        c, h = p
        return (int(bool(c.correct) and bool(h.get("predictions_file"))), int(c.kind == "eval-run"))

    c, h = max(pairs, key=rank)
    test = None
    why = "no per-question predictions recorded for both; the paired test needs an `eval` run on each"
    hc = _holder_correct(holder_vdir, h)
    if c.correct and hc:
        test = paired_test(c.correct, hc)
        if test is None:
            why = "the recorded predictions share no question ids"
    h_acc = float(h["accuracy"])
    return {"eval_set": c.eval_set, "eval_kind": c.kind, "candidate_accuracy": c.accuracy, "candidate_n": c.n,
            "holder_accuracy": h_acc, "holder_n": h.get("n"), "passed": c.accuracy >= h_acc - 1e-12,
            "paired_test": test, "paired_test_unavailable": None if test else why}


def format_gate(g: dict[str, Any], holder: str, alias: str) -> list[str]:
    def acc(a: float, n: Any) -> str:
        return f"{a:.4f}" + (f" (n={n})" if n else "")

    lines = [f"gate: candidate {acc(g['candidate_accuracy'], g['candidate_n'])} vs @{alias} {holder} "
             f"{acc(g['holder_accuracy'], g['holder_n'])} on eval set {g['eval_set']} ({g['eval_kind']})"]
    t = g.get("paired_test")
    if t:
        lines.append(f"gate: McNemar on {t['n']} paired questions: candidate-only correct {t['candidate_only_correct']}, "
                     f"holder-only correct {t['holder_only_correct']}, p = {t['p_value']:.4g}"
                     + (" (not significant at 0.05)" if t["p_value"] >= 0.05 else " (significant at 0.05)"))
    else:
        lines.append(f"gate: paired test not run: {g.get('paired_test_unavailable')}")
    return lines
