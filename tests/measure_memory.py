"""Measure the peak memory of this project's trainer and compare it with preflight's estimate (CPU).

    python -m tests.measure_memory [OUT.jsonl]     # the settings of tests/test_memory_model.py, then EXTRA

Each setting is a real train job run through the workload entry (`python -m runner.workloads`, as `runner run`
starts it), by default on the real `smollm2-135m` base: a few optimizer steps, then the peak RSS of that one
process (its VmHWM, polled from /proc until it exits) against `runner.preflight`'s estimate for the same job. While it runs,
/proc/PID/status is polled, so that the peak can be placed in a phase of the run (loading, validation, a step).
The measured numbers and where the model's constants come from: docs/containers.md, "Checked against this trainer".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.preflight.memory import GiB
from runner.preflight.probe import Hardware
from runner.spec import job_from_data
from tests.train_helpers import REPO, train_env, write_run_dir

CACHE = Path(os.environ.get("RUNNER_TEST_CACHE", str(REPO / ".runner" / "cache")))
MiB = 1024**2


def trainer_job(name: str, batch_size: int, max_seq_len: int, layout: str = "grouped", fused_lora: bool = True,
                steps: int = 2, threads: int = 1, model: dict[str, Any] | None = None,
                over: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A short LoRA job (r=16 on all seven projections, fp32 on the CPU), by default on the real smollm2-135m;
    `over` updates sections (e.g. {"model": {"gradient_checkpointing": True}})."""
    job = {
        "name": name,
        "kind": "train",
        "model": model or {"base": "smollm2-135m"},
        "lora": {"r": 16, "alpha": 32,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": [{"path": "builtin:categories", "limit": 400}], "val_fraction": 0.05, "val_limit": 4},
        "train": {"steps": steps, "batch_size": batch_size, "max_seq_len": max_seq_len, "layout": layout,
                  "fused_lora": fused_lora, "lr": 1e-4, "warmup_steps": 0, "eval_every": 1000, "save_every": 1000,
                  "log_every": 1, "threads": threads, "deterministic": True},
    }
    for section, values in (over or {}).items():
        job[section] = {**job[section], **values}
    return job


@dataclass
class Measured:
    peak_bytes: float  # the trainer process's own high-water mark (VmHWM)
    rc: int
    seconds: float
    log: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, VmRSS bytes)

    def phase_of_peak(self) -> str:
        """The last log line printed before the polled RSS first came within 1% of its highest. The allocator
        keeps what it has, so the RSS stays near the peak to the end, and the highest sample alone can fall at
        any later line."""
        if not self.rss:
            return "?"
        top = max(r for _, r in self.rss)
        t_peak = next(t for t, r in self.rss if r >= 0.99 * top)
        before = [ln for t, ln in self.log if t <= t_peak]
        return before[-1] if before else "(before the first line)"

    def output(self) -> str:
        return "\n".join(ln for _, ln in self.log)


def _vm(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of `pid` in bytes: its resident memory now and at its highest since its exec."""
    try:
        found = {ln.split(":")[0]: float(ln.split()[1]) * 1024
                 for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(("VmRSS:", "VmHWM:"))}
    except (OSError, ValueError, IndexError):
        return None
    return (found["VmRSS"], found["VmHWM"]) if len(found) == 2 else None


def run_trainer(job: dict[str, Any], run_dir: Path, cache: Path = CACHE, timeout: float = 600,
                entry: tuple[str, ...] = ("-m", "runner.workloads")) -> Measured:
    """Run the train job in its own process and measure it (its peak RSS: that process alone, since its exec)."""
    write_run_dir(run_dir, job)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, *entry], cwd=REPO, env=train_env(run_dir, cache),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    m = Measured(0.0, -1, 0.0)

    def read() -> None:
        assert p.stdout is not None
        for ln in p.stdout:
            m.log.append((time.monotonic() - t0, ln.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done = threading.Event()

    hwm = [0.0]

    def poll() -> None:
        while not done.is_set():
            # Only once the trainer has printed: until its exec, a vfork child reads as its parent's memory.
            got = _vm(p.pid) if m.log else None
            if got is not None:
                m.rss.append((time.monotonic() - t0, got[0]))
                hwm[0] = max(hwm[0], got[1])
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
        done.set()
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    poller.join(timeout=1)
    # The peak is the process's own high-water mark (VmHWM, polled until it exits), not wait4's ru_maxrss: a
    # child started by fork/vfork and exec keeps in ru_maxrss the parent's resident size at the exec (Linux
    # carries the old mm's high-water mark over), so from a large parent, such as a long pytest session, it read
    # the parent's 2.7 GiB whatever the trainer used. ru_maxrss is the fallback when /proc could not be read.
    m.peak_bytes = hwm[0] or float(usage.ru_maxrss) * 1024
    m.rc = p.returncode
    m.seconds = time.monotonic() - t0
    return m


def estimate_job(job: dict[str, Any]) -> Any:
    """Preflight's report for the job on this host (a CPU job: host memory is the capacity)."""
    from runner.preflight.report import preflight

    return preflight(job_from_data(job), hardware=Hardware(host_memory_bytes=64 * GiB))


# (name, batch_size, max_seq_len, layout): the test's settings. Grouped rows at two token budgets and the 4D-mask
# packed layout, each a few seconds of training on two cores.
SETTINGS = [
    ("grouped-512", 2, 256, "grouped"),
    ("grouped-1k", 4, 256, "grouped"),
    ("packed-2x512", 2, 512, "packed"),
]
TINY_384x12 = {"base": "tiny", "tiny": {"hidden_size": 384, "layers": 12, "heads": 6, "pretrain_steps": 0}}
# More settings for `python -m tests.measure_memory`: a larger budget, one row of 1024, the padded and varlen layouts,
# PEFT's own LoRA forward, gradient checkpointing, torch.compile, another shape (the tiny base at hidden 384, MLP
# 1536, 12 layers). (name, batch_size, max_seq_len, layout, fused LoRA, model, section overrides)
GC = {"model": {"gradient_checkpointing": True}}
COMPILE = {"train": {"compile": True}}
EXTRA: list[tuple[str, int, int, str, bool, dict[str, Any] | None, dict[str, dict[str, Any]] | None]] = [
    ("grouped-2k", 8, 256, "grouped", True, None, None),
    ("packed-1x1024", 1, 1024, "packed", True, None, None),
    ("padded-1k", 4, 256, "padded", True, None, None),
    ("varlen-1k", 4, 256, "varlen", True, None, None),
    ("grouped-1k-peft", 4, 256, "grouped", False, None, None),
    ("grouped-2k-peft", 8, 256, "grouped", False, None, None),
    ("grouped-512-checkpointed", 2, 256, "grouped", True, None, GC),
    ("grouped-1k-checkpointed", 4, 256, "grouped", True, None, GC),
    ("grouped-2k-checkpointed", 8, 256, "grouped", True, None, GC),
    ("grouped-1k-compiled", 4, 256, "grouped", True, None, COMPILE),
    ("grouped-2k-compiled", 8, 256, "grouped", True, None, COMPILE),
    ("tiny384x12-grouped-2k", 8, 256, "grouped", True, TINY_384x12, None),
]


def measure_setting(name: str, batch: int, seq: int, layout: str, fused: bool = True,
                    model: dict[str, Any] | None = None, over: dict[str, dict[str, Any]] | None = None,
                    steps: int = 2) -> dict[str, Any]:
    """Run one setting's train job and compare its peak RSS with preflight's estimate of the same job."""
    job = trainer_job(f"mem-{name}", batch, seq, layout, fused, steps=steps, model=model, over=over)
    with tempfile.TemporaryDirectory() as d:
        m = run_trainer(job, Path(d) / "run")
    if m.rc != 0:
        raise RuntimeError(f"{name}: the trainer exited {m.rc}\n{m.output()[-3000:]}")
    rep = estimate_job(job)
    return {"setting": name, "batch_size": batch, "max_seq_len": seq, "layout": layout, "fused_lora": fused,
            "peak_mib": round(m.peak_bytes / MiB), "estimate_mib": round(rep.total_bytes / MiB),
            "ratio": round(rep.total_bytes / m.peak_bytes, 3), "peak_during": m.phase_of_peak(),
            "seconds": round(m.seconds, 1),
            "components_mib": {c.name: round(c.bytes / MiB, 1) for c in rep.components}}


def main() -> int:
    out = open(sys.argv[1], "a") if len(sys.argv) > 1 else None
    for s in [(*x, True, None, None) for x in SETTINGS] + EXTRA:
        res = measure_setting(*s)
        print(json.dumps(res), flush=True)
        if out:
            out.write(json.dumps(res) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
