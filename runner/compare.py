"""`runner compare RUN_OR_EVAL...`: one table of runs and evals (accuracy, by difficulty, ECE, tokens seen), a chart,
and McNemar's paired test against the first eval when two evals answered the same questions.

Host side: reads eval.json and metrics.jsonl from run directories; never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.stats import paired_mcnemar, wilson_interval

DIFFICULTIES = ("easy", "medium", "hard")
EXIT_OK, EXIT_INVALID = 0, 2


class CompareError(Exception):
    pass


@dataclass
class Entry:
    """One column of the comparison: a run (with or without eval.json) or a bare eval.json file."""

    ref: str
    label: str
    kind: str
    path: Path
    eval: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        if self.eval is not None and isinstance(self.eval.get("accuracy"), (int, float)):
            return float(self.eval["accuracy"])
        vals = [m for m in self.metrics if m.get("split") == "val" and isinstance(m.get("accuracy"), (int, float))]
        return float(vals[-1]["accuracy"]) if vals else None

    @property
    def n(self) -> int | None:
        if self.eval is not None and isinstance(self.eval.get("n"), int):
            return int(self.eval["n"])
        vals = [m for m in self.metrics if m.get("split") == "val" and isinstance(m.get("n"), int)]
        return int(vals[-1]["n"]) if vals else None

    @property
    def best_val(self) -> float | None:
        vals = [float(m["accuracy"]) for m in self.metrics
                if m.get("split") == "val" and isinstance(m.get("accuracy"), (int, float))]
        return max(vals) if vals else None

    def job(self) -> dict[str, Any]:
        """The run's resolved job (job.yaml), or {} for a bare eval.json."""
        d = self.path if self.path.is_dir() else self.path.parent
        try:
            from ruamel.yaml import YAML

            data = YAML(typ="safe").load((d / "job.yaml").read_text())
            return data if isinstance(data, dict) else {}
        except Exception:  # a missing or damaged job.yaml leaves only the hyperparameter diff empty
            return {}

    @property
    def chance(self) -> float | None:
        """Accuracy of guessing among each question's choices (from the per-question rows)."""
        from runner.registry.evidence import letter_facts

        rows: Any = self.eval
        d = self.path if self.path.is_dir() else self.path.parent
        if rows is None and (d / "val_step0.json").is_file():
            rows = _read_json(d / "val_step0.json")
        return letter_facts(rows)[1] if rows else None

    def by_difficulty(self) -> dict[str, float]:
        rows = (self.eval or {}).get("by_difficulty") or {}
        return {k: float(v["accuracy"]) for k, v in rows.items() if isinstance(v, dict) and "accuracy" in v}

    @property
    def ece(self) -> float | None:
        v = (self.eval or {}).get("ece")
        return float(v) if isinstance(v, (int, float)) else None

    @property
    def tokens_seen(self) -> int | None:
        """Training tokens from metrics.jsonl: the largest cumulative count, else the sum of per-line counts."""
        cumulative = [m[k] for m in self.metrics for k in ("tokens_seen", "total_tokens", "train_tokens")
                      if isinstance(m.get(k), (int, float))]
        if cumulative:
            return int(max(cumulative))
        per_line = [m["tokens"] for m in self.metrics if m.get("split") == "train" and isinstance(m.get("tokens"), (int, float))]
        return int(sum(per_line)) if per_line else None

    def correct(self) -> dict[str, bool] | None:
        preds = (self.eval or {}).get("predictions")
        if not isinstance(preds, list) or not preds:
            return None
        out = {}
        for p in preds:
            if not isinstance(p, dict) or "id" not in p:
                return None
            if isinstance(p.get("correct"), bool):
                out[str(p["id"])] = p["correct"]
            elif "pred" in p and "answer" in p:
                out[str(p["id"])] = str(p["pred"]) == str(p["answer"])
            else:
                return None
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); was the eval interrupted?") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path}: expected a JSON object (an eval.json)")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the rest still counts
        if isinstance(m, dict):
            out.append(m)
    return out


def _kind_of(run_dir: Path, ev: dict[str, Any] | None) -> str:
    st = run_dir / "status.json"
    if st.is_file():
        try:
            kind = json.loads(st.read_text()).get("kind")
            if kind:
                return str(kind)
        except (OSError, json.JSONDecodeError):
            pass
    return "eval" if ev is not None else "run"


def resolve(ref: str) -> Entry:
    """A run id / job name / `job/id` (via the run store), a run directory, or an eval.json file."""
    p = Path(ref)
    if p.is_file():
        data = _read_json(p)
        label = f"{p.parent.parent.name}/{p.parent.name}" if (p.parent / "status.json").is_file() else str(p)
        return Entry(ref, label, "eval", p, data, _read_metrics(p.parent / "metrics.jsonl"))
    if p.is_dir() and ((p / "eval.json").is_file() or (p / "metrics.jsonl").is_file() or (p / "status.json").is_file()):
        run_dir = p
        label = f"{p.parent.name}/{p.name}"
    else:
        from runner.runs import RunError, RunStore

        try:
            run = RunStore().get(ref)
        except RunError as e:
            raise CompareError(str(e)) from None
        run_dir = run.dir
        label = run.ref
    ev: dict[str, Any] | None = None
    if (run_dir / "eval.json").is_file():
        ev = _read_json(run_dir / "eval.json")
    metrics = _read_metrics(run_dir / "metrics.jsonl")
    if ev is None and not metrics:
        raise CompareError(f"{ref}: {run_dir} has neither eval.json nor metrics.jsonl yet (has the run finished?)")
    return Entry(ref, label, _kind_of(run_dir, ev), run_dir, ev, metrics)


# --- output --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _tokens(x: int | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return str(x)


def table_rows(entries: list[Entry]) -> list[list[str]]:
    rows = []
    for e in entries:
        acc, n = e.accuracy, e.n
        ci = ""
        if acc is not None and n:
            lo, hi = wilson_interval(round(acc * n), n)
            ci = f" [{100 * lo:.1f}-{100 * hi:.1f}]"
        diff = e.by_difficulty()
        model = str((e.eval or {}).get("label") or "-")
        rows.append([
            e.label, e.kind, model, str(n) if n is not None else "-", _pct(acc) + ci,
            *[_pct(diff.get(d)) for d in DIFFICULTIES],
            f"{e.ece:.3f}" if e.ece is not None else "-", _tokens(e.tokens_seen),
        ])
    return rows


HEADERS = ["run / eval", "kind", "model", "n", "accuracy % [95% CI]", "easy", "medium", "hard", "ECE", "tokens seen"]


def legend_names(entries: list[Entry]) -> list[str]:
    """Job names for legends; a run id suffix only where two entries share a job name."""
    jobs = [str(e.job().get("name") or e.label.split("/")[0]) for e in entries]
    return [f"{j} ({e.label.rsplit('-', 1)[-1]})" if jobs.count(j) > 1 else j
            for j, e in zip(jobs, entries, strict=True)]


IGNORED_PARAMS = ("name", "description", "spec_hash")


def param_diff(entries: list[Entry]) -> list[list[str]]:
    """The resolved job fields (dotted) whose values differ between the entries: [field, value per entry]."""
    from runner.tracking import flatten

    flat = [flatten({k: v for k, v in e.job().items() if k not in IGNORED_PARAMS}) for e in entries]
    if len(entries) < 2 or not any(flat):
        return []
    keys = sorted(set().union(*flat))
    rows = []
    for k in keys:
        vals = [f.get(k, "-") for f in flat]
        if len(set(vals)) > 1:
            rows.append([k, *[v if len(v) <= 40 else v[:37] + "..." for v in vals]])
    return rows


def paired_tests(entries: list[Entry]) -> list[dict[str, Any]]:
    """McNemar of each eval against the first one that has per-question predictions, on their shared ids."""
    with_preds = [(e, c) for e in entries if (c := e.correct())]
    if len(with_preds) < 2:
        return []
    (base, base_c), rest = with_preds[0], with_preds[1:]
    out = []
    for e, c in rest:
        r = paired_mcnemar(base_c, c)
        out.append({
            "first": base.label, "second": e.label, "n": r.n, "only_first": r.only_first, "only_second": r.only_second,
            "delta": r.accuracy_second - r.accuracy_first if r.n else None, "p_value": r.p_value, "method": r.method,
            "disjoint": r.n == 0,
        })
    return out


def verdict(t: dict[str, Any], alpha: float = 0.05) -> str:
    if t["disjoint"]:
        return "no questions in common: not comparable pairwise"
    sig = "significant" if t["p_value"] < alpha else "not significant"
    return f"{100 * t['delta']:+.2f} points, p={t['p_value']:.4g} ({sig} at {alpha})"


def print_report(entries: list[Entry], tests: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title="comparison")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("run / eval", "kind", "model") else "right")
    for row in table_rows(entries):
        table.add_row(*row)
    console.print(table)
    diff = param_diff(entries)
    if diff:
        hp = Table(title="what differs (resolved jobs)")
        hp.add_column("field")
        for name in legend_names(entries):
            hp.add_column(name)
        for row in diff:
            hp.add_row(*row)
        console.print(hp)
    elif len(entries) >= 2 and all(e.job() for e in entries):
        console.print("what differs: nothing in the resolved jobs (same hyperparameters; seeds and data included)")
    for t in tests:
        if t["disjoint"]:
            console.print(f"McNemar, {t['second']} against {t['first']}: {verdict(t)}", soft_wrap=True)
        else:
            console.print(
                f"McNemar, {t['second']} against {t['first']}: {verdict(t)}.\n"
                f"  {t['n']} shared questions: {t['only_second']} right only in {t['second']}, "
                f"{t['only_first']} right only in {t['first']} [{t['method']}]", soft_wrap=True,
            )
    evals = [e for e in entries if e.eval is not None]
    if len(evals) >= 2 and not tests:
        console.print("McNemar: needs per-question predictions in both eval.json files (eval jobs write them).")


def write_png(entries: list[Entry], path: Path) -> None:
    """Accuracy per entry, overall and by difficulty, with 95% intervals on the overall bar, the chance rate
    as a dashed line, and a hatched empty bar where a value was not measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = ["overall", *DIFFICULTIES]
    width = 0.8 / max(len(entries), 1)
    names = legend_names(entries)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups) + 0.4 * len(entries)), 4.5))
    missing = False
    for i, e in enumerate(entries):
        diff = e.by_difficulty()
        vals = [e.accuracy, *[diff.get(d) for d in DIFFICULTIES]]
        xs = [g + (i - (len(entries) - 1) / 2) * width for g in range(len(groups))]
        ys = [100 * v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, ys, width, label=names[i])
        color = bars[0].get_facecolor()
        if e.accuracy is not None and e.n:
            lo, hi = wilson_interval(round(e.accuracy * e.n), e.n)
            ax.errorbar(xs[0], ys[0], yerr=[[ys[0] - 100 * lo], [100 * hi - ys[0]]], fmt="none", ecolor="k", capsize=3)
        for x, v in zip(xs, vals, strict=True):
            if v is None:  # a full-height outline, hatched in the entry's colour: visibly "no value", not "0%"
                missing = True
                ax.bar(x, 100, width, facecolor="none", edgecolor=color, hatch="///", linewidth=0.8)
    chances = {round(c, 4) for e in entries if (c := e.chance) is not None}
    if len(chances) == 1:
        ax.axhline(100 * chances.pop(), color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    handles, labels = ax.get_legend_handles_labels()
    if missing:
        handles.append(Patch(facecolor="none", edgecolor="grey", hatch="///"))
        labels.append("not measured")
    ax.legend(handles, labels, fontsize=7)
    ax.set_title("accuracy (overall with 95% CI)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_curves(entries: list[Entry], path: Path) -> bool:
    """Validation accuracy (0-100%, with the chance rate) and validation loss over training steps, one line per
    run; False when no entry has validation rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for e, name in zip(entries, legend_names(entries), strict=True):
        val = [m for m in e.metrics if m.get("split") == "val" and isinstance(m.get("step"), int)]
        if val:
            series.append((name, e.chance, val))
    if not series:
        return False
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, _, val in series:
        pts = [(m["step"], 100 * m["accuracy"]) for m in val if isinstance(m.get("accuracy"), (int, float))]
        acc_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        pts = [(m["step"], m["loss"]) for m in val if isinstance(m.get("loss"), (int, float))]
        loss_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    chances = {round(c, 4) for _, c, _ in series if c is not None}
    if len(chances) == 1:
        acc_ax.axhline(100 * chances.pop(), color="grey", linestyle="--", linewidth=1, label="chance")
    acc_ax.set_ylim(0, 100)  # the whole scale: a 0.4-point wobble stays a wobble
    acc_ax.set(xlabel="step", ylabel="validation accuracy (%)", title="validation accuracy")
    loss_ax.set_ylim(bottom=0)
    loss_ax.set(xlabel="step", ylabel="validation loss", title="validation loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def default_png(entries: list[Entry]) -> Path:
    from runner.paths import runner_home

    key = hashlib.sha256("\0".join(str(e.path.resolve()) for e in entries).encode()).hexdigest()[:10]
    return runner_home() / "compare" / f"compare-{key}.png"


def compare_main(refs: list[str], out_png: str | None) -> int:
    """Print the comparison table and paired tests; write the chart. Exit 0, or 2 when a ref cannot be read."""
    if not refs:
        print("error: give at least one run or eval.json to compare", file=sys.stderr)
        return EXIT_INVALID
    try:
        entries = [resolve(r) for r in refs]
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    tests = paired_tests(entries)
    print_report(entries, tests)
    png = Path(out_png) if out_png else default_png(entries)
    try:
        write_png(entries, png)
        print(f"chart: {png}")
        curves = png.with_name(png.stem + "-curves.png")
        if write_curves(entries, curves):
            print(f"curves: {curves}")
    except ImportError:
        print("warning: matplotlib is not installed; no chart written", file=sys.stderr)
    except OSError as e:
        print(f"error: cannot write {png}: {e.strerror}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK
