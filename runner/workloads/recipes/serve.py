"""The agents' HTTP service (job kind `serve`): FastAPI behind uvicorn, with concurrent answer requests
micro-batched into one forward pass, a bounded queue (503 + Retry-After when full) and per-request deadlines
that return the agent's fallback answer instead of hanging.

    POST /v1/answer    {"question", "choices"} or a list of them -> {"answer", "reasoning", "confidence"} (or a list)
                       (422 when a prompt is longer than max_prompt_tokens; 413 when the body is over max_body_bytes)
    POST /v1/question  {"topic"?, "n"?} -> {"questions": [...]} in the tournament's format
    GET  /healthz      liveness, model, queue depth and batching counters
    GET  /metrics      the same and request counts, latency and batch-size histograms (Prometheus text format)
    GET  /docs         OpenAPI docs
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runner.files import atomic_write
from runner.workloads.agents.answer import AnswerAgent
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.agents.sources import question_agent_from_spec, resolve_token
from runner.workloads.serving.app import bind, create_app, prompt_token_limit, url_of
from runner.workloads.serving.batcher import MicroBatcher
from runner.workloads.serving.engines import EngineError, close_engines, is_engine

# --- HTTP ----------------------------------------------------------------------------------------------


# --- the job ---------------------------------------------------------------------------------------------


def build_agents(spec: Any, log: Any = print) -> tuple[AnswerAgent, QuestionAgent, str]:
    """Answer and question agents from a serve job's spec (or anything with the same fields)."""
    from runner.workloads.agents.format_filter import token_counter
    from runner.workloads.agents.sources import load_source, pick_device

    device = pick_device(getattr(spec, "device", "auto"))
    model, tok, desc = load_source(spec, device, log)
    members = [(model, tok)]
    for extra in getattr(spec, "ensemble", []):
        m, t, d = load_source(extra, device, log)
        members.append((m, t))
        desc += f" + {d}"
    a = spec.answer
    if device != "cpu" and getattr(a, "cuda_graphs", False):
        from runner.workloads.scoring.cuda_graphs import enable_cuda_graphs

        for m, t in members:
            if not is_engine(m):
                enable_cuda_graphs(m, t.pad_token_id, log)
    agent = AnswerAgent(members, permutations=a.permutations, deadline_s=a.deadline_s, batch_size=a.batch_size,
                        reasoning=a.reasoning, prompt=spec.prompt)
    qa = question_agent_from_spec(spec.question, agent, (model, tok), token_counter(tok))
    return agent, qa, desc


def run(job: Any, run_dir: Path) -> int:
    import uvicorn

    spec = job.spec
    srv = spec.server
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    os.environ.setdefault("QA_ENGINE_LOG_DIR", str(run_dir))  # an engine server's log lives with the run
    try:
        agent, qagent, desc = build_agents(spec)
    except (FileNotFoundError, ValueError, EngineError) as e:
        print(f"error: {e}", flush=True)
        close_engines()
        return 1
    batcher = MicroBatcher(agent, max_batch=srv.max_batch, window_s=srv.batch_window_ms / 1000,
                           queue_size=srv.queue_size).start()
    token = resolve_token(srv.token)
    app = create_app(agent, batcher, qagent, token=token, model_name=desc,
                     max_prompt_tokens=prompt_token_limit(agent, srv.max_prompt_tokens),
                     max_body_bytes=int(srv.max_body_mb * (1 << 20)))
    try:
        sock = bind(srv.host, srv.port)
    except OSError as e:
        print(f"error: cannot listen on {srv.host}:{srv.port}: {e.strerror}; pick another server.port (0 = any free)")
        return 1
    url = url_of(sock)
    atomic_write(run_dir / "serve.json", json.dumps({
        "url": url, "host": sock.getsockname()[0], "port": sock.getsockname()[1], "pid": os.getpid(),
        "model": desc, "engine": spec.engine, "auth": token is not None, "started": time.time(),
    }, indent=2) + "\n")
    fast = {m: importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")}
    stack = f"http: {'httptools' if fast['httptools'] else 'h11'}, loop: {'uvloop' if fast['uvloop'] else 'asyncio'}"
    print(f"serving {desc} at {url} (docs: {url}/docs; {stack})", flush=True)
    if not all(fast.values()):
        print("note: without httptools and uvloop (the workloads extra installs them) the HTTP layer, not the "
              "model, limits throughput", flush=True)

    signals: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            signals.append(sig)
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown (the process would die by the signal);
            # the workload contract is a clean exit 130 instead.
            if hasattr(self, "_captured_signals"):
                self._captured_signals.clear()

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    if srv.max_seconds is not None:
        timer = threading.Timer(srv.max_seconds, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    stopped = False
    try:
        server.run(sockets=[sock])
    finally:
        stopped = batcher.stop()
        sock.close()
        close_engines()
    print(f"stopped after answering {batcher.items} questions in {batcher.batches} batches", flush=True)
    code = 130 if any(s in (signal.SIGTERM, signal.SIGINT) for s in signals) else 0
    if not stopped:
        # Leaving a thread inside a native forward pass to interpreter shutdown can abort the process
        # (SIGABRT, no exit code of ours): end now; nothing is left to write.
        print("note: a forward pass was still running at shutdown; not waiting for it", flush=True)
        sys.stderr.flush()
        os._exit(code)
    return code
