"""The promotion gate: a candidate against the alias holder on an eval set both were measured on, with
McNemar's paired test (runner.stats) when both have per-question results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.registry.evidence import Eval, version_eval_runs
from runner.registry.store import EXIT_REFUSED, RegistryError
from runner.stats import paired_mcnemar, wilson_interval


def paired_test(cand: dict[str, bool], holder: dict[str, bool]) -> dict[str, Any] | None:
    """McNemar's test on the questions both were scored on (runner.stats); None when they share none."""
    t = paired_mcnemar(cand, holder)
    if t.n == 0:
        return None
    return {"test": "mcnemar", "n": t.n, "candidate_only_correct": t.only_first, "holder_only_correct": t.only_second,
            "p_value": round(t.p_value, 6), "candidate_accuracy": t.accuracy_first,
            "holder_accuracy": t.accuracy_second}


def holder_evals(vdir: Path, manifest: dict[str, Any]) -> list[Eval]:
    """What the alias holder was measured on: the evals recorded at its promotion, then `eval` runs of it since."""
    out = [e for rec in manifest.get("evals", []) if isinstance(rec, dict) and (e := Eval.from_record(rec, vdir))]
    seen = {e.source for e in out}
    return out + [e for e in version_eval_runs(manifest) if e.source not in seen]


def describe(evals: list[Eval]) -> str:
    return "[" + ", ".join(f"{e.eval_set} ({e.kind})" for e in evals) + "]" if evals else "[none]"


def gate(cands: list[Eval], held: list[Eval]) -> dict[str, Any]:
    """Compare the candidate with the alias holder on an eval set both were measured on.

    Returns the gate record: `passed`, the pair of accuracies, the eval set and the paired test (or why none).
    Raises RegistryError when they share no eval set (the caller names the commands that would make one).
    """
    pairs = [(c, h) for c in cands for h in held if c.eval_set == h.eval_set]
    if not pairs:
        raise RegistryError(f"candidate and holder were never evaluated on the same questions: candidate has "
                            f"{describe(cands)}, holder has {describe(held)}", EXIT_REFUSED)

    def rank(p: tuple[Eval, Eval]) -> tuple[int, int, int]:
        c, h = p
        return (int(bool(c.correct) and bool(h.correct)), int(c.kind == "eval-run"), int(h.kind == "eval-run"))

    c, h = max(pairs, key=rank)
    test = None
    why = "no per-question predictions recorded for both; the paired test needs an `eval` run on each"
    if c.correct and h.correct:
        test = paired_test(c.correct, h.correct)
        if test is None:
            why = "the recorded predictions share no question ids"
    return {"eval_set": c.eval_set, "eval_kind": c.kind, "candidate_accuracy": c.accuracy, "candidate_n": c.n,
            "holder_accuracy": h.accuracy, "holder_n": h.n, "holder_source": h.source,
            "passed": c.accuracy >= h.accuracy - 1e-12, "paired_test": test,
            "paired_test_unavailable": None if test else why}


def chance_level(ev: Eval) -> list[str]:
    """Why an evaluation looks like guessing: one letter for every question, or an accuracy whose 95% interval
    does not clear the chance rate of its questions. Empty when neither holds."""
    why = []
    if ev.letters:
        letter, count = max(ev.letters.items(), key=lambda kv: kv[1])
        total = sum(ev.letters.values())
        if total >= 2 and count == total:
            why.append(f"it answers {letter} to every question ({count} of {total})")
    n = len(ev.correct) if ev.correct else ev.n
    if ev.chance is not None and n:
        k = sum(ev.correct.values()) if ev.correct else round(ev.accuracy * n)
        lo, hi = wilson_interval(k, n)
        if lo <= ev.chance:
            why.append(f"accuracy {ev.accuracy:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={n}) is not above the chance "
                       f"rate {ev.chance:.4f} of guessing among its choices")
    return why


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
