"""What `runner compare` and `runner show` draw and print beside the numbers: the hyperparameters that differ, the
chance rate, full-scale accuracy axes, hatched bars where nothing was measured, job names in legends; and the
plain-spoken lines users read (parameter counts, a late answer's reason)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.compare import compare_main, legend_names, param_diff, resolve, write_curves, write_png


def _run(home: Path, job: str, rid: str, lr: float, accs: list[float]) -> Path:
    d = home / "runs" / job / rid
    d.mkdir(parents=True)
    spec = {"name": job, "kind": "train", "spec_hash": rid[-4:] * 4, "train": {"lr": lr, "steps": 20, "seed": 0},
            "lora": {"r": 8}, "tags": {"team": "blue"}}
    (d / "job.yaml").write_text(yaml.safe_dump(spec))
    rows = [{"step": 10 * i, "split": "val", "accuracy": a, "loss": 1.4 - 0.01 * i, "n": 40}
            for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "status.json").write_text(json.dumps({"kind": "train", "state": "succeeded"}))
    preds = [{"id": f"q{i}", "correct": i % 4 == 0, "answer": "A", "pred": "A", "choices": 4} for i in range(40)]
    (d / "val_step0.json").write_text(json.dumps({"step": 0, "predictions": preds}))
    return d


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import matplotlib.figure

    figs: list[Any] = []
    real = matplotlib.figure.Figure.savefig

    def keep(self: Any, *a: Any, **k: Any) -> Any:
        figs.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_compare_prints_the_hyperparameters_that_differ(runner_home: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _run(runner_home, "lr-high", "20260101-000000-aaaa", 3e-3, [0.25, 0.5, 0.6])
    _run(runner_home, "lr-low", "20260101-000000-bbbb", 1e-4, [0.25, 0.3, 0.35])
    assert compare_main(["lr-high", "lr-low"], str(tmp_path / "c.png")) == 0
    out = capsys.readouterr().out
    assert "what differs" in out and "train.lr" in out and "0.003" in out and "0.0001" in out
    assert "lora.r" not in out.split("what differs")[1]  # the same in both: not a difference
    assert "train.steps" not in out.split("what differs")[1]
    entries = [resolve("lr-high"), resolve("lr-low")]
    assert param_diff(entries) == [["train.lr", "0.003", "0.0001"]]
    assert legend_names(entries) == ["lr-high", "lr-low"]  # job names, not run ids
    assert (tmp_path / "c-curves.png").read_bytes()[:4] == b"\x89PNG"


def test_two_runs_of_one_job_get_their_id_in_the_legend(runner_home: Path) -> None:
    _run(runner_home, "same", "20260101-000000-aaaa", 3e-3, [0.25, 0.5])
    _run(runner_home, "same", "20260101-000001-bbbb", 3e-3, [0.25, 0.4])
    entries = [resolve("same/20260101-000000-aaaa"), resolve("same/20260101-000001-bbbb")]
    assert legend_names(entries) == ["same (aaaa)", "same (bbbb)"]
    assert param_diff(entries) == []


def test_charts_hatch_what_was_not_measured_and_draw_chance_on_a_full_scale(
        runner_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(runner_home, "a", "20260101-000000-aaaa", 3e-3, [0.25, 0.252, 0.256])  # a 0.6-point wobble
    _run(runner_home, "b", "20260101-000000-bbbb", 1e-3, [0.25, 0.26, 0.27])
    entries = [resolve("a"), resolve("b")]
    figs = _capture(monkeypatch)
    write_png(entries, tmp_path / "bars.png")
    (ax,) = figs[-1].axes
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2 * 3  # easy/medium/hard were not measured for either run
    assert all(p.get_height() == 100 and p.get_facecolor()[3] == 0 for p in hatched)  # outlined, not a 0% bar
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["chance", "a", "b", "not measured"] or set(labels) == {"chance", "a", "b", "not measured"}
    chance = [ln for ln in ax.get_lines() if ln.get_label() == "chance"]
    assert chance and chance[0].get_ydata()[0] == pytest.approx(25.0)

    assert write_curves(entries, tmp_path / "curves.png")
    acc_ax, loss_ax = figs[-1].axes
    assert acc_ax.get_ylim() == (0, 100)  # the wobble stays a wobble
    assert loss_ax.get_ylim()[0] == 0 and "validation loss" in loss_ax.get_title()
    assert {t.get_text() for t in acc_ax.get_legend().get_texts()} == {"a", "b", "chance"}


def test_show_plots_validation_loss_and_a_full_scale_accuracy(runner_home: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.run_views import plots
    from runner.runs import RunStore

    d = _run(runner_home, "a", "20260101-000000-aaaa", 3e-3, [0.25, 0.252, 0.256])
    with (d / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 10, "split": "train", "loss": 2.0}) + "\n")
    figs = _capture(monkeypatch)
    r = RunStore(runner_home).get("a")
    assert [p.name for p in plots(r, r.metrics())] == ["loss.png", "accuracy.png"]
    loss_ax, acc_ax = figs[0].axes[0], figs[1].axes[0]
    assert {ln.get_label() for ln in loss_ax.get_lines()} == {"train loss", "val loss"}
    assert acc_ax.get_ylim() == (0, 100) and "chance" in {ln.get_label() for ln in acc_ax.get_lines()}


def test_parameter_counts_read_at_their_scale() -> None:
    from runner.preflight.memory import params_text

    assert params_text(812_345) == "812.3 k"  # the tiny model: not "0.00 B"
    assert params_text(134_515_008) == "134.5 M"
    assert params_text(235.09e9) == "235.09 B"


def test_a_late_answer_on_an_idle_service_says_why_without_blaming_a_queue() -> None:
    from runner.workloads.agents.answer import AnswerItem
    from runner.workloads.serving.batcher import MicroBatcher

    class Agent:  # the batcher only needs the agent's fallback for a request that is already late
        def fallback(self, item: AnswerItem, why: str = "") -> dict[str, Any]:
            return {"answer": "A", "reasoning": why, "confidence": 0.25}

        def answer_many(self, items: list[AnswerItem], deadline: float) -> list[dict[str, Any]]:
            raise AssertionError("a late request must not be scored")

    b = MicroBatcher(Agent()).start()  # type: ignore[arg-type]
    try:
        fut = b.submit([AnswerItem("q?", ["x", "y"])], time.monotonic() - 0.01)
        why = fut.result(timeout=5)[0]["reasoning"]
    finally:
        b.stop()
    assert "in the queue" not in why
    assert "the service was otherwise idle" in why and "deadline passed before scoring began" in why
