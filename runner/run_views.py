"""What `runner ls` and `runner show` say about a run: its reconciled state, metric summaries, serve and
tournament sections, and the loss/accuracy plots (matplotlib, imported only to draw)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.runs import Run


def reconcile(r: Run) -> str:
    """The run's state, corrected when its driver died: asks the backend, marks orphans."""
    st = r.status()
    state = str(st.get("state", "pending"))
    if state not in ("running", "pending") or r.is_locked():
        return state
    if state == "pending":
        return state
    from runner.backends import poll_run

    seen = poll_run(r)
    if seen is not None and seen[0] == "running":
        if not st.get("orphan"):
            r.update(orphan=True)
            r.note("orphan", detail="the job is still running but no runner process drives it")
        return "running (orphaned)"
    if seen is not None and seen[0] in ("succeeded", "failed", "cancelled"):
        r.set_state(seen[0], exit_code=seen[1])
        return seen[0]
    r.set_state("failed", error="the runner driving this run died; `runner run` the job again to resume it")
    return "failed"


def ls_rows(runs: list[Run]) -> tuple[list[list[str]], list[str]]:
    """`runner ls` rows (run, job, kind, state, backend, started, steps, final val acc, best val acc @ step), and a line per unreadable run:
    one damaged run must not hide the others."""
    from runner.runs import RunError

    rows: list[list[str]] = []
    unreadable: list[str] = []
    for r in runs:
        try:
            st = r.status()
            state = reconcile(r) if "rebuilt_from" not in st else str(st.get("state"))  # read-only: no repair
        except RunError as e:
            unreadable.append(f"skipped a run: {e}")
            continue
        if "rebuilt_from" in st:
            unreadable.append(f"{r.ref}: state rebuilt from {st['rebuilt_from']}")
        ms = r.metrics()
        acc = last(ms, "val", "accuracy")
        step = last(ms, "train", "step")
        rows.append([r.id, r.job_name, str(st.get("kind", "")), state, str(st.get("backend", "")),
                     str(st.get("started_at") or st.get("created_at") or "")[:19].replace("T", " "),
                     "" if step is None else str(step), "" if acc is None else f"{acc:.3f}", best_cell(r, ms)])
    return rows, unreadable


def best_cell(r: Run, metrics: list[dict[str, Any]]) -> str:
    """The best checkpoint's validation accuracy and step: the one `runner promote` takes by default (the
    trainer's best pointer; else the highest accuracy after step 0)."""
    from runner.registry.evidence import _best_pointer, step_of

    vals = {int(m["step"]): float(m["accuracy"]) for m in metrics if m.get("split") == "val"
            and isinstance(m.get("accuracy"), (int, float)) and isinstance(m.get("step"), int) and m["step"] > 0}
    best = _best_pointer(r)
    step = step_of(best) if best is not None else None
    if step is None or step not in vals:
        if not vals:
            return ""
        step = max(vals, key=lambda s: (vals[s], s))
    return f"{vals[step]:.3f} @{step}"


def last(metrics: list[dict[str, Any]], split: str, key: str) -> Any:
    for m in reversed(metrics):
        if m.get("split") == split and key in m:
            return m[key]
    return None


def first(metrics: list[dict[str, Any]], split: str, key: str) -> Any:
    for m in metrics:
        if m.get("split") == split and key in m:
            return m[key]
    return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def served(r: Run, state: str) -> list[str]:
    """Where a serve run answers (or answered): the URL its serve.json names."""
    info = read_json(r.dir / "serve.json")
    if not isinstance(info, dict) or not info.get("url"):
        return []
    url = info["url"]
    if not state.startswith("running"):
        return [f"served     {url} (stopped)"]
    auth = "; needs its bearer token" if info.get("auth") else ""
    return [f"serving    {url}  (POST /v1/answer, /v1/question; docs {url}/docs; metrics {url}/metrics{auth})"]


def tournament(r: Run) -> list[str]:
    """A tournament run's ranking, from tournament.json."""
    board = read_json(r.dir / "tournament.json")
    if not isinstance(board, dict) or not isinstance(board.get("teams"), dict):
        return []
    teams = board["teams"]

    def pct(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}%"

    out = [f"winner     {board.get('winner') or 'none (every team is out)'}"]
    for name in board.get("ranking", list(teams)):
        b = teams.get(name, {})
        out.append(
            f"  {b.get('rank', '?')}. {name}: score {b.get('score', 0):.1f} (answers {pct(b.get('answer_score'))}, "
            f"questions {pct(b.get('question_score'))}, valid {b.get('valid_fraction', 0):.0%})"
            + ("  OUT: under the valid-question minimum" if b.get("disqualified") else "")
        )
    if (r.dir / "report.md").exists():
        out.append(f"report     {r.dir / 'report.md'}")
    return out


def plots(r: Run, ms: list[dict[str, Any]]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency of the package: say so rather than leave the plots out without a word
        print("warning: matplotlib is not installed; no loss/accuracy plots (pip install matplotlib)", file=sys.stderr)
        return []
    out = []
    for name, key in (("loss.png", "loss"), ("accuracy.png", "accuracy")):
        series = {split: [(m["step"], m[key]) for m in ms if m.get("split") == split and key in m and "step" in m]
                  for split in ("train", "val")}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for split, pts in series.items():
            if pts:
                scale = 100 if key == "accuracy" else 1
                ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                        label=f"{split} {key}")
        if key == "accuracy":
            from runner.registry.evidence import letter_facts

            chance = letter_facts(read_json(r.dir / "val_step0.json") or {})[1]
            if chance is not None:
                ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(0, 100)  # the whole scale: a 0.4-point wobble is not drawn as a cliff
            ax.set_ylabel("accuracy (%)")
        else:
            ax.set_ylim(bottom=0)
            ax.set_ylabel("loss")
        ax.set_xlabel("step")
        ax.set_title(f"{r.job_name} {r.id}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(r.dir / name, dpi=100)
        plt.close(fig)
        out.append(r.dir / name)
    return out
