"""Load benchmark of the answer service: the `serve` job on the tiny model, driven from this (second) process
by 16 concurrent clients. Runs it twice, micro-batched and one request per forward pass, and prints
requests/s, p50/p99 latency and `serve_batching_speedup` (the ratio of the two throughputs).

    python bench/serve_bench.py [--requests 400] [--concurrency 16]
    python bench/serve_bench.py --engines builtin,vllm,llamacpp --gguf FILE.gguf   # engines side by side
    SERVE_BENCH_DEVICE=cuda python bench/serve_bench.py --shape 7b --lone   # GPU: a random-init 7B-shaped model

`--engines` serves the real `smollm2-135m` base (or `--base`) through each engine in turn, the same service in
front, and prints requests/s and p50/p99 at 1 and at `--concurrency` clients for each (`llamacpp` needs `--gguf`,
e.g. a registry version's gguf/q8_0.gguf). The GPU run: `SERVE_BENCH_DEVICE=cuda python bench/serve_bench.py
--engines builtin,vllm --base DIR`.

`--shape 0.5b|7b` serves a random-init bf16 Qwen2.5-shaped model (bench/model_shapes.py) with the tiny
tokenizer, saved once to a temp directory (nothing is downloaded); `--lone` also measures one client alone.
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
    from runner.workloads.agents import procedural

    out = []
    for i in range(n):
        topic = procedural.TOPICS[i % len(procedural.TOPICS)]
        p = procedural.generate_many(topic, 1, seed=i)[0].to_tournament()
        out.append({"question": p["question"], "choices": p["choices"]})
    return out


def shaped_model(shape: str, out: Path) -> dict[str, Any]:
    """A random-init model of a benchmark shape with the tiny tokenizer, saved to `out`; its `model:` section."""
    import torch
    from model_shapes import SIZES  # bench/ is on sys.path when run as a script
    from transformers import AutoModelForCausalLM, Qwen2Config

    from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    shape_cfg = dict(SIZES[shape], vocab_size=max(SIZES[shape]["vocab_size"], len(tok)))
    cfg = Qwen2Config(**shape_cfg, max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    dtype = torch.bfloat16 if DEVICE != "cpu" else torch.float32
    t = time.perf_counter()
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    print(f"{shape}-shaped random-init model saved in {time.perf_counter() - t:.0f} s")
    return {"base": str(out), "dtype": "bf16" if DEVICE != "cpu" else "fp32"}


def start_service(run_dir: Path, max_batch: int, window_ms: float, model: dict[str, Any],
                  graphs: bool = True, extra: dict[str, Any] | None = None) -> tuple[subprocess.Popen[str], str]:
    from ruamel.yaml import YAML

    job = {
        "kind": "serve", "name": "serve-bench", "model": model, "device": DEVICE, "threads": THREADS,
        "answer": {"cuda_graphs": graphs},
        "server": {"host": "127.0.0.1", "port": 0, "max_batch": max_batch, "batch_window_ms": window_ms,
                   "queue_size": 1024},
        **(extra or {}),
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
    """`concurrency` closed-loop clients on one aiohttp session (a load generator light enough to leave the
    service the CPU: httpx costs ~2 ms of client CPU per request, aiohttp ~0.3 ms)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as c:
        for _ in range(50):  # wait until it answers
            try:
                async with c.get("/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)

        async def post(q: dict[str, Any]) -> int:
            async with c.post("/v1/answer", json=q) as r:
                await r.read()
                return r.status

        await asyncio.gather(*(post(qs[i % len(qs)]) for i in range(concurrency)))  # warm-up

        async def client() -> None:
            nonlocal errors
            for i in counter:
                t = time.perf_counter()
                status = await post(qs[i % len(qs)])
                latencies.append(time.perf_counter() - t)
                errors += status != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, errors


def measure(label: str, max_batch: int, window_ms: float, qs: list[dict[str, Any]], n: int, conc: int,
            tmp: Path, model: dict[str, Any], graphs: bool = True) -> float:
    proc, url = start_service(tmp / label, max_batch, window_ms, model, graphs)
    try:
        elapsed, lat, errors = asyncio.run(drive(url, qs, n, conc))
        health = json.loads(__import__("urllib.request").request.urlopen(f"{url}/healthz").read())
    except Exception as e:  # the service died or stopped answering: show why, go on with the next measurement
        proc.poll()
        log = (tmp / label / "run.log").read_text()
        print(f"serve_{label}_failed: {type(e).__name__}: {e} (service exit code {proc.returncode})\n{log[-4000:]}")
        return float("nan")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for line in (tmp / label / "run.log").read_text().splitlines():
            if "cuda graphs" in line:
                print(f"serve_{label}: {line}")
    lat.sort()
    rps = n / elapsed
    print(f"serve_{label}_requests_per_s: {rps:.1f}")
    print(f"serve_{label}_latency_p50_ms: {1000 * statistics.median(lat):.1f}")
    print(f"serve_{label}_latency_p99_ms: {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f}")
    print(f"serve_{label}_errors: {errors}")
    print(f"serve_{label}_mean_batch: {health['answered'] / max(1, health['batches']):.1f}")
    return rps


def report(label: str, n: int, elapsed: float, lat: list[float], errors: int) -> float:
    lat = sorted(lat)
    rps = n / elapsed
    print(f"serve_{label}_requests_per_s: {rps:.1f}")
    print(f"serve_{label}_latency_p50_ms: {1000 * statistics.median(lat):.1f}")
    print(f"serve_{label}_latency_p99_ms: {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f}")
    print(f"serve_{label}_errors: {errors}")
    return rps


def measure_engines(engines: list[str], base: str, gguf: str | None, qs: list[dict[str, Any]], n: int, conc: int,
                    tmp: Path) -> None:
    """Each engine behind the same service, at 1 client and at `conc` clients; a table at the end."""
    rows = []
    for engine in engines:
        extra: dict[str, Any] = {"engine": engine}
        if engine == "vllm":
            extra["vllm"] = {"dtype": os.environ.get("SERVE_BENCH_VLLM_DTYPE", "bfloat16"), "max_num_seqs": 32}
        if engine == "llamacpp":
            if gguf is None:
                raise SystemExit("--engines llamacpp needs --gguf FILE.gguf")
            extra["llamacpp"] = {"gguf": str(Path(gguf).resolve()), "n_threads": max(1, THREADS)}
        t = time.perf_counter()
        proc, url = start_service(tmp / engine, 32, 4.0, {"base": base}, extra=extra)
        up = time.perf_counter() - t
        try:
            row = [engine, f"{up:.0f}"]
            for clients, count in ((1, max(20, n // 8)), (conc, n)):
                elapsed, lat, errors = asyncio.run(drive(url, qs, count, clients))
                rps = report(f"{engine}_c{clients}", count, elapsed, lat, errors)
                lat.sort()
                row += [f"{rps:.1f}", f"{1000 * statistics.median(lat):.0f}",
                        f"{1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.0f}"]
            rows.append(row)
        except Exception as e:
            print(f"serve_{engine}_failed: {type(e).__name__}: {e}\n{(tmp / engine / 'run.log').read_text()[-3000:]}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    head = ["engine", "start s", "1 client req/s", "p50 ms", "p99 ms", f"{conc} clients req/s", "p50 ms", "p99 ms"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--shape", default="tiny", help="tiny (the trained tiny base) or a bench/model_shapes.py size")
    ap.add_argument("--random", action="store_true", help="random-init weights even for `tiny` (a quick smoke test)")
    ap.add_argument("--lone", action="store_true", help="also measure one client alone (micro-batched service)")
    ap.add_argument("--compare-graphs", action="store_true",
                    help="GPU: also measure 16 clients and one client with `answer.cuda_graphs: false`")
    ap.add_argument("--engines", help="comma-separated engines to compare (builtin, vllm, llamacpp)")
    ap.add_argument("--base", default="smollm2-135m", help="--engines: the base model served")
    ap.add_argument("--gguf", help="--engines llamacpp: the GGUF file")
    args = ap.parse_args()
    qs = questions(100)
    if args.engines:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        print(f"{args.base} on {DEVICE} ({THREADS} torch thread(s)): engines {', '.join(engines)}, "
              f"{args.requests} requests at {args.concurrency} clients, procedural questions")
        with tempfile.TemporaryDirectory() as d:
            measure_engines(engines, args.base, args.gguf, qs, args.requests, args.concurrency, Path(d))
        return 0
    window = float(os.environ.get("SERVE_BENCH_WINDOW_MS", "4"))
    with tempfile.TemporaryDirectory() as d:
        trained_tiny = args.shape == "tiny" and not args.random
        model = {"base": "tiny"} if trained_tiny else shaped_model(args.shape, Path(d) / "model")
        from runner.workloads.recipes.pretrain_tiny import build_tiny_tokenizer
        from runner.workloads.scoring.prompts import format_prompt

        tok = build_tiny_tokenizer()
        mean_tokens = statistics.mean(len(tok(format_prompt(q["question"], q["choices"]))["input_ids"]) for q in qs)
        print(f"{args.shape} model on {DEVICE} ({THREADS} torch thread(s)), {args.requests} requests, "
              f"{args.concurrency} concurrent clients, procedural questions of {mean_tokens:.0f} tokens on average")
        batched = measure("batched", 32, window, qs, args.requests, args.concurrency, Path(d), model)
        single = measure("single", 1, 0.0, qs, args.requests, args.concurrency, Path(d), model)
        if args.lone:
            measure("lone_client", 32, window, qs, max(50, args.requests // 8), 1, Path(d), model)
        if args.compare_graphs:
            measure("batched_no_graphs", 32, window, qs, args.requests, args.concurrency, Path(d), model, False)
            measure("lone_client_no_graphs", 32, window, qs, max(50, args.requests // 8), 1, Path(d), model, False)
    print(f"serve_batching_speedup: {batched / single:.2f} (target >= 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
