"""Load benchmark of the answer service: the `serve` job on the tiny model, driven from this (second) process
by 16 concurrent clients. Runs it twice, micro-batched and one request per forward pass, and prints
requests/s, p50/p99 latency and `serve_batching_speedup` (the ratio of the two throughputs).

    python bench/serve_bench.py [--requests 400] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


DEVICE = os.environ.get("SERVE_BENCH_DEVICE", "cpu")
THREADS = int(os.environ.get("SERVE_BENCH_THREADS", "1"))  # the client needs a core too


def questions(n: int) -> list[dict[str, Any]]:
    from runner.workloads import procedural

    out = []
    for i in range(n):
        topic = procedural.TOPICS[i % len(procedural.TOPICS)]
        p = procedural.generate_many(topic, 1, seed=i)[0].to_tournament()
        out.append({"question": p["question"], "choices": p["choices"]})
    return out


def start_service(run_dir: Path, max_batch: int, window_ms: float) -> tuple[subprocess.Popen[str], str]:
    from ruamel.yaml import YAML

    job = {
        "kind": "serve", "name": "serve-bench", "model": {"base": "tiny"}, "device": DEVICE, "threads": THREADS,
        "server": {"host": "127.0.0.1", "port": 0, "max_batch": max_batch, "batch_window_ms": window_ms,
                   "queue_size": 1024},
    }
    run_dir.mkdir(parents=True)
    with open(run_dir / "job.yaml", "w") as f:
        YAML().dump(job, f)
    env = dict(os.environ, RUNNER_RUN_DIR=str(run_dir))
    env.setdefault("RUNNER_CACHE", str(ROOT / ".runner" / "cache"))
    log = open(run_dir / "run.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "runner.workloads"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 1200  # the first run may build the tiny base model
    while not (run_dir / "serve.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not start:\n{(run_dir / 'run.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, json.loads((run_dir / "serve.json").read_text())["url"]


async def drive(url: str, qs: list[dict[str, Any]], n: int, concurrency: int) -> tuple[float, list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        for _ in range(50):  # wait until it answers
            try:
                if (await c.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        await asyncio.gather(*(c.post("/v1/answer", json=qs[i % len(qs)]) for i in range(concurrency)))  # warm-up

        async def client() -> None:
            nonlocal errors
            for i in counter:
                t = time.perf_counter()
                r = await c.post("/v1/answer", json=qs[i % len(qs)])
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, errors


def measure(label: str, max_batch: int, window_ms: float, qs: list[dict[str, Any]], n: int, conc: int,
            tmp: Path) -> float:
    proc, url = start_service(tmp / label, max_batch, window_ms)
    try:
        elapsed, lat, errors = asyncio.run(drive(url, qs, n, conc))
        health = json.loads(__import__("urllib.request").request.urlopen(f"{url}/healthz").read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat.sort()
    rps = n / elapsed
    print(f"serve_{label}_requests_per_s: {rps:.1f}")
    print(f"serve_{label}_latency_p50_ms: {1000 * statistics.median(lat):.1f}")
    print(f"serve_{label}_latency_p99_ms: {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f}")
    print(f"serve_{label}_errors: {errors}")
    print(f"serve_{label}_mean_batch: {health['answered'] / max(1, health['batches']):.1f}")
    return rps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    qs = questions(100)
    print(f"tiny model on {DEVICE} ({THREADS} torch thread(s)), {args.requests} requests, {args.concurrency} concurrent clients, procedural questions")
    with tempfile.TemporaryDirectory() as d:
        batched = measure("batched", 32, float(os.environ.get("SERVE_BENCH_WINDOW_MS", "4")), qs, args.requests,
                          args.concurrency, Path(d))
        single = measure("single", 1, 0.0, qs, args.requests, args.concurrency, Path(d))
    print(f"serve_batching_speedup: {batched / single:.2f} (target >= 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
