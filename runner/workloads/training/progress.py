"""Training telemetry: metrics.jsonl rows, throughput and MFU against the GPU's dense peak, the console view."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from runner.files import atomic_write

# Dense bf16 peak FLOP/s per device, for the MFU estimate (override with RUNNER_PEAK_TFLOPS).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "MI300X": 1307.0, "MI250X": 383.0}


class Metrics:
    """Appends one JSON object per line to metrics.jsonl (and TensorBoard scalars when asked)."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("warning: logging.tensorboard is on but tensorboard is not installed", file=sys.stderr)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row['split']}/{k}", v, row["step"])

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines written after the checkpoint (they will be written again)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write(self.path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("RUNNER_PEAK_TFLOPS"):
        return float(os.environ["RUNNER_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


class ProgressView:
    """A rich progress bar (loss, accuracy, tokens/s) when stdout is a terminal; silent otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.live = enabled and sys.stdout.isatty()
        self.total, self.start = total, start
        self.fields: dict[str, Any] = {"loss": float("nan"), "acc": float("nan"), "tps": 0.0}

    def __enter__(self) -> ProgressView:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  {task.fields[tps]:.0f} tok/s"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, **self.fields)
        return self

    def update(self, step: int, **fields: Any) -> None:
        if self.live:
            self.fields.update(fields)
            self.bar.update(self.task, completed=step, **self.fields)

    def __exit__(self, *a: object) -> None:
        if self.live:
            self.bar.stop()


def first_val_row(run_dir: Path) -> dict[str, Any] | None:
    """The step-0 validation row of metrics.jsonl (a resumed run reports its gain against it)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for ln in path.read_text().splitlines():
        row = json.loads(ln)
        if row.get("split") == "val" and row.get("step") == 0:
            return row
    return None


STEP0_PREDICTIONS = "val_step0.json"


def write_step0_predictions(run_dir: Path, predictions: dict[str, Any]) -> None:
    """The step-0 per-question results, kept beside metrics.jsonl so the final report (even after a resume) can
    run McNemar's paired test of the trained model against the base on the same held-out questions."""
    from runner.files import atomic_write

    atomic_write(run_dir / STEP0_PREDICTIONS, json.dumps(predictions) + "\n")


def stop_reason(signum: int) -> str:
    """What a stop signal means to the person who sent it (the runner turns Ctrl-C into SIGTERM)."""
    import signal

    if signum == signal.SIGINT:
        return "Ctrl-C (SIGINT)"
    if signum == signal.SIGTERM:
        return "a stop request (SIGTERM: Ctrl-C in the runner, `runner cancel`, or the scheduler)"
    return f"signal {signum}"


def gain_report(run_dir: Path, final: dict[str, Any] | None) -> str:
    """McNemar's paired test of the final validation against step 0, as text for the last log line ('' when the
    step-0 results are missing or cover other questions)."""
    from runner.stats import paired_mcnemar

    path = run_dir / STEP0_PREDICTIONS
    if final is None or not path.is_file():
        return ""
    try:
        first = {p["id"]: bool(p["correct"]) for p in json.loads(path.read_text())["predictions"]}
    except (ValueError, KeyError, TypeError):
        return ""
    last = {p["id"]: bool(p["correct"]) for p in final["predictions"]}
    if set(first) != set(last):
        return ""
    r = paired_mcnemar(first, last)
    at = f"step {final['step']}" if isinstance(final.get("step"), int) else "the end"
    return (f"McNemar, {at} against step 0 on {r.n} held-out questions: {r.only_second} right only at {at}, "
            f"{r.only_first} right only at step 0; p={r.p_value:.3g} ({r.method})")


def quiet_libraries() -> None:
    """Our log lines, not the libraries' progress bars and deprecation notices, in run.log."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\b")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
