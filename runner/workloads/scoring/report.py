"""The eval kind's outputs: eval.json, report.md and the reliability diagram."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from runner.files import atomic_write


def reliability_png(out: dict[str, Any], path: Path) -> None:
    """Reliability diagram (accuracy against confidence per bin) with the confidence histogram beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(out.get("label", "model"), out["reliability"])]
    curves += [(m["label"], m["reliability"]) for m in out.get("members", [])]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    main = curves[0][1]
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in main], [b["accuracy"] for b in main],
           width=[b["hi"] - b["lo"] for b in main], alpha=0.35, edgecolor="k", label=f"{curves[0][0]} (bins)")
    for label, bins in curves:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", ms=3, label=label)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability: ECE {out['ece']:.3f}, accuracy {out['accuracy']:.1%} (n={out['n']})")
    ax.legend(fontsize=7, loc="upper left")
    hx.bar([(b["lo"] + b["hi"]) / 2 for b in main], [b["n"] for b in main],
           width=[b["hi"] - b["lo"] for b in main], color="C0", edgecolor="k")
    hx.set_xlabel("confidence (top letter probability)")
    hx.set_ylabel("questions")
    hx.set_xlim(0, 1)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def report_md(out: dict[str, Any]) -> str:
    lo, hi = out["accuracy_ci95"]
    lines = [
        f"# Eval: {out['job']}",
        "",
        f"**{out['label']}** on {out['n']} questions (`{out['eval_set']}`), method `{out['method']}`, "
        f"device {out['device']}, {out['seconds']} s.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(out['accuracy'])} ({out['correct']}/{out['n']}; 95% CI {_pct(lo)}-{_pct(hi)}) |",
        f"| ECE | {out['ece']:.4f} |",
        f"| Brier | {out['brier']:.4f} |",
        f"| NLL | {out['nll']:.4f} |",
        f"| mean confidence | {out['mean_confidence']:.4f} |",
    ]
    if "timing" in out and out["timing"].get("questions_per_s"):
        lines.append(f"| questions/s | {out['timing']['questions_per_s']} |")
    lines += ["", "![reliability diagram](reliability.png)", ""]
    for title, key in (("difficulty", "by_difficulty"), ("source", "by_source"), ("topic", "by_topic")):
        rows = out.get(key) or {}
        if not rows:
            continue
        lines += [f"## By {title}", "", f"| {title} | n | accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {_pct(v['accuracy'])} |" for k, v in rows.items()]
        lines.append("")
    shares = out.get("prediction_shares") or {}
    if shares:
        lines += ["## Letters predicted vs answers", "", "| letter | predicted | gold |", "|---|---|---|"]
        lines += [f"| {k} | {_pct(v['predicted'])} | {_pct(v['gold'])} |" for k, v in shares.items()]
        lines.append("")
    sections = [out] + list(out.get("members", []))
    for sec in sections:
        who = "" if sec is out else f" ({sec['label']})"
        if "letter_bias" in sec:
            lb = sec["letter_bias"]
            lines += [f"## Letter-prior bias{who}", "", "Accuracy with the gold answer moved to each position:", "",
                      "| position | n | accuracy |", "|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_pct(v['accuracy'])} |" for k, v in lb["accuracy_by_position"].items()]
            lines += ["", f"Spread (best - worst position): {_pct(lb['spread'])}; cost {lb['cost']['passes']} passes, "
                      f"{lb['cost']['questions_scored']} questions scored, {lb['cost']['seconds']} s.", ""]
        if "debias" in sec:
            d = sec["debias"]
            lines += [f"## Permutation debiasing{who}", "",
                      f"Cyclic shifts: accuracy {_pct(d['plain_accuracy'])} plain -> {_pct(sec['accuracy'])} debiased; "
                      f"cost {d['cost']['passes']} passes, {d['cost']['questions_scored']} questions scored, "
                      f"{d['cost']['seconds']} s.", ""]
        if "cross_check" in sec:
            c = sec["cross_check"]
            lines += [f"## Cross-check: per-choice log-likelihood{who}", "",
                      f"Agreement with the letters method: {_pct(c['agreement'])}; per-choice accuracy "
                      f"{_pct(c['per_choice']['accuracy'])}; the letters method was {c['speedup_vs_per_choice']}x faster.", ""]
    if "members" in out:
        e = out["ensemble"]
        lines += ["## Ensemble members", "", "| member | accuracy | ECE | Brier |", "|---|---|---|---|"]
        lines += [f"| {m['label']} | {_pct(m['accuracy'])} | {m['ece']:.4f} | {m['brier']:.4f} |" for m in out["members"]]
        lines += [f"| **mean of probabilities** | {_pct(e['mean']['accuracy'])} | {e['mean']['ece']:.4f} | {e['mean']['brier']:.4f} |",
                  f"| **majority vote** | {_pct(e['vote']['accuracy'])} | {e['vote']['ece']:.4f} | {e['vote']['brier']:.4f} |",
                  "", f"All members agree on {_pct(e['members_agree'])} of the questions; at least one is right on "
                  f"{_pct(e['oracle_accuracy'])}.", ""]
    return "\n".join(lines) + "\n"


def write_outputs(out: dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "eval.json", json.dumps(out, indent=1) + "\n")
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 0, "split": "eval", "accuracy": out["accuracy"], "n": out["n"],
                            "ece": out["ece"], "brier": out["brier"], "eval_set": out["eval_set"]}) + "\n")
    try:
        reliability_png(out, run_dir / "reliability.png")
    except ImportError:
        print("warning: matplotlib is not installed; no reliability diagram", file=sys.stderr)
    atomic_write(run_dir / "report.md", report_md(out))
