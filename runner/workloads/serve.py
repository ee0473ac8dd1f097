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

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field, field_validator

from runner.runs import atomic_write
from runner.workloads.agents import MAX_DEADLINE_S, AnswerAgent, AnswerItem, QuestionAgent
from runner.workloads.prompts import LETTERS, format_prompt, strip_choice_prefix

DEADLINE_GRACE_S = 0.25  # a forward pass already running when the deadline passes may finish this much later
# Prompt length is checked without the tokenizer where bytes decide it: every token of a byte-level (or
# byte-fallback) vocabulary spans at least one byte, plus a few special tokens; and none spans this many bytes.
SPECIAL_TOKENS_SLACK = 8
MAX_BYTES_PER_TOKEN = 32


class QueueFull(Exception):
    pass


@dataclass
class _Entry:
    items: list[AnswerItem]
    deadline: float
    future: concurrent.futures.Future[list[dict[str, Any]]]


def _settle(fut: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    # The waiting request may have given up (deadline) and cancelled the future; that is not an error here.
    try:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class MicroBatcher:
    """One worker thread that gathers queued requests into one forward pass.

    The first waiting request holds the batch open for at most `window_s` (or until `max_batch` questions);
    requests that arrive while a pass runs are all taken by the next one, so under load batches fill up
    without waiting. The window is skipped when the service is idle (the last pass answered one question and
    nothing else is queued): a lone request does not wait for company that is not coming. Requests whose
    deadline passed while queued get the agent's fallback answer.
    """

    def __init__(self, agent: AnswerAgent, *, max_batch: int = 32, window_s: float = 0.004, queue_size: int = 256):
        self.agent = agent
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[_Entry] = queue.Queue(maxsize=queue_size)
        self.batches = 0
        self.items = 0
        self.fallbacks = 0
        self.last_batch = 0  # questions in the last pass
        self.on_batch: Any = None  # called with each pass's number of questions (metrics)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MicroBatcher:
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking batches; wait up to `timeout` for a running pass. False if it is still running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            return not self._thread.is_alive()
        return True

    def submit(self, items: list[AnswerItem], deadline: float) -> concurrent.futures.Future[list[dict[str, Any]]]:
        fut: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()
        try:
            self.queue.put_nowait(_Entry(items, deadline, fut))
        except queue.Full:
            raise QueueFull from None
        return fut

    def _gather(self, first: _Entry) -> list[_Entry]:
        batch, n = [first], len(first.items)
        idle = self.last_batch <= 1 and self.queue.empty()
        until = time.monotonic() + (0.0 if idle else self.window_s)
        while n < self.max_batch:
            try:
                e = self.queue.get_nowait()
            except queue.Empty:
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    e = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            batch.append(e)
            n += len(e.items)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = self._gather(first)
            now = time.monotonic()
            live = []
            for e in batch:
                if e.future.done():
                    continue
                if e.deadline <= now:
                    self.fallbacks += len(e.items)
                    _settle(e.future, [self.agent.fallback(it, "deadline passed in the queue") for it in e.items])
                else:
                    live.append(e)
            if not live:
                continue
            items = [it for e in live for it in e.items]
            try:
                answers = self.agent.answer_many(items, min(e.deadline for e in live))
            except Exception as ex:  # a bad batch must not kill the worker; each request gets the error
                for e in live:
                    _settle(e.future, error=ex)
                continue
            self.batches += 1
            self.items += len(items)
            self.last_batch = len(items)
            if self.on_batch is not None:
                self.on_batch(len(items))
            i = 0
            for e in live:
                _settle(e.future, answers[i : i + len(e.items)])
                i += len(e.items)


# --- HTTP ----------------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is read into memory (declared by
    Content-Length, or counted as a chunked body arrives)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes (server.max_body_mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        over = False

        async def counted_receive() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Any) -> None:
            if not over:  # once over the limit, whatever the app makes of the aborted read is replaced by 413
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if over:
            await self._reject(send)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (observed from several threads)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip((*self.bounds, float("inf")), counts, strict=True):
            acc += c
            le = "+Inf" if b == float("inf") else f"{b:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {total:.6f}" if labels else f"{name}_sum {total:.6f}")
        out.append(f"{name}_count{{{labels}}} {acc}" if labels else f"{name}_count {acc}")
        return out


class Metrics:
    """What /metrics reports: HTTP requests by path and status, their latency, and the batcher's counters."""

    LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(self.BATCH_BOUNDS)
        self._lock = threading.Lock()

    def request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            hist = self.latency.setdefault(path, Histogram(self.LATENCY_BOUNDS))
        hist.observe(seconds)

    def render(self, batcher: MicroBatcher, model: str) -> str:
        with self._lock:
            requests = sorted(self.requests.items())
            latency = sorted(self.latency.items())
        out = [
            "# HELP qa_info The served model.", "# TYPE qa_info gauge", f'qa_info{{model="{_label(model)}"}} 1',
            "# HELP qa_http_requests_total HTTP requests by path and status code.",
            "# TYPE qa_http_requests_total counter",
        ]
        out += [f'qa_http_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in requests]
        out += ["# HELP qa_http_request_seconds Time from request to response.",
                "# TYPE qa_http_request_seconds histogram"]
        for p, h in latency:
            out += h.lines("qa_http_request_seconds", f'path="{p}"')
        out += ["# HELP qa_batch_questions Questions answered per forward pass.", "# TYPE qa_batch_questions histogram"]
        out += self.batch_size.lines("qa_batch_questions")
        for name, kind, value, text in (
            ("qa_queue_requests", "gauge", batcher.queue.qsize(), "Requests waiting for a forward pass."),
            ("qa_batches_total", "counter", batcher.batches, "Forward passes run."),
            ("qa_answered_total", "counter", batcher.items, "Questions answered by the model."),
            ("qa_fallbacks_total", "counter", batcher.fallbacks, "Questions answered by the fallback (deadline)."),
        ):
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by its route's path (unknown paths as "other") and status."""

    def __init__(self, app: Any, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in self.paths else "other", status, time.monotonic() - t0)


def _prompt_bytes(item: AnswerItem) -> int:
    return len(format_prompt(item.question, item.choices).encode())


def fits_by_bytes(item: AnswerItem, limit: int) -> bool:
    """True when the prompt's byte count alone proves it is at most `limit` tokens."""
    return _prompt_bytes(item) + SPECIAL_TOKENS_SLACK <= limit


def prompt_length_problem(tokenizer: Any, item: AnswerItem, limit: int) -> str | None:
    """Why an item's prompt is over `limit` tokens, or None. Tokenizes only when the byte count cannot decide."""
    from runner.workloads.scoring import encode_prompts

    size = _prompt_bytes(item)
    if size + SPECIAL_TOKENS_SLACK <= limit:
        return None
    if size > limit * MAX_BYTES_PER_TOKEN:
        return f"question and choices are {size} bytes, far over this service's {limit}-token limit"
    n = len(encode_prompts(tokenizer, [item])[0])
    if n > limit:
        return f"question and choices are {n} tokens; this service takes at most {limit}"
    return None


class AnswerRequest(BaseModel):
    question: str = Field(min_length=1, description="The question text.")
    choices: list[str] = Field(
        min_length=2, max_length=len(LETTERS), description="2-10 choices, with or without 'A) ' prefixes."
    )
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S, description="Answer within this many seconds.")

    @field_validator("question")
    @classmethod
    def _q(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question is blank")
        return v

    @field_validator("choices")
    @classmethod
    def _c(cls, v: list[str]) -> list[str]:
        for i, c in enumerate(v):
            if not strip_choice_prefix(c):
                raise ValueError(f"choice {i + 1} has no text")
        return v


class AnswerResponse(BaseModel):
    answer: str = Field(description="One letter, always one of the question's choices.")
    reasoning: str = Field(description="At most 100 words.")
    confidence: float = Field(description="Probability of the chosen letter.")


class QuestionRequest(BaseModel):
    topic: str | None = Field(None, description="Topic; omitted: the agent's topics in turn.")
    n: int = Field(1, ge=1, le=100, description="How many questions.")


class Question(BaseModel):
    topic: str
    question: str
    choices: list[str]
    answer: str
    explanation: str


class QuestionResponse(BaseModel):
    questions: list[Question]


def create_app(
    answer_agent: AnswerAgent,
    batcher: MicroBatcher,
    question_agent: QuestionAgent | None = None,
    *,
    token: str | None = None,
    model_name: str = "",
    max_prompt_tokens: int = 2048,
    max_body_bytes: int = 4 << 20,
) -> FastAPI:
    app = FastAPI(
        title="qa-runner agents",
        description="Answer agent and question agent in the tournament's formats.",
        version="1",
    )
    metrics = Metrics()
    batcher.on_batch = metrics.batch_size.observe
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    # Added last, so outermost: it also counts what BodyLimit refuses.
    app.add_middleware(RequestMetrics, metrics=metrics,
                       paths=frozenset({"/v1/answer", "/v1/question", "/healthz", "/metrics"}))
    q_lock = threading.Lock()

    async def auth(request: Request) -> None:
        if token is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {token}":
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "queue": batcher.queue.qsize(),
            "batches": batcher.batches,
            "answered": batcher.items,
            "fallbacks": batcher.fallbacks,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render(batcher, model_name)

    @app.post("/v1/answer", dependencies=[Depends(auth)])
    async def answer(
        body: AnswerRequest | Annotated[list[AnswerRequest], Field(min_length=1, max_length=256)],
    ) -> AnswerResponse | list[AnswerResponse]:
        reqs = body if isinstance(body, list) else [body]
        items = [AnswerItem(r.question.strip(), [strip_choice_prefix(c) for c in r.choices]) for r in reqs]
        # A prompt far past what the model was served for would hold the worker (and everyone queued behind it)
        # for as long as its forward pass takes: refuse it up front. Short prompts are decided by their bytes.
        if not all(fits_by_bytes(it, max_prompt_tokens) for it in items):
            problems = await run_in_threadpool(
                lambda: [prompt_length_problem(answer_agent.tokenizer, it, max_prompt_tokens) for it in items]
            )
            for i, why in enumerate(problems):
                if why is not None:
                    where = f"item {i}: " if isinstance(body, list) else ""
                    raise HTTPException(422, f"{where}{why} (server.max_prompt_tokens); shorten it")
        limit = min((r.deadline_s or answer_agent.deadline_s) for r in reqs)
        deadline = time.monotonic() + limit
        try:
            fut = batcher.submit(items, deadline)
        except QueueFull:
            raise HTTPException(503, "the answer queue is full; retry shortly", headers={"Retry-After": "1"}) from None
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=limit + DEADLINE_GRACE_S)
        except TimeoutError:
            batcher.fallbacks += len(items)
            results = [answer_agent.fallback(it, "deadline passed") for it in items]
        out = [AnswerResponse(**r) for r in results]
        return out if isinstance(body, list) else out[0]

    @app.post("/v1/question", dependencies=[Depends(auth)])
    async def question(body: QuestionRequest) -> QuestionResponse:
        if question_agent is None:
            raise HTTPException(404, "this service has no question agent")

        def make() -> list[dict[str, Any]]:
            with q_lock:
                return question_agent.generate(body.topic, body.n)

        try:
            qs = await run_in_threadpool(make)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        except RuntimeError as e:
            raise HTTPException(500, str(e)) from None
        return QuestionResponse(questions=[Question(**q) for q in qs])

    return app


# --- the job ---------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prompt_token_limit(agent: AnswerAgent, configured: int, log: Any = print) -> int:
    """`server.max_prompt_tokens`, but never past the positions every model of the agent was built for."""
    positions = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m, _ in agent.members]
    known = [p for p in positions if isinstance(p, int) and p > 0]
    if known and min(known) < configured:
        log(f"note: prompts are limited to {min(known)} tokens, the model's max_position_embeddings "
            f"(server.max_prompt_tokens is {configured})")
        return min(known)
    return configured


def build_agents(spec: Any, log: Any = print) -> tuple[AnswerAgent, QuestionAgent, str]:
    """Answer and question agents from a serve job's spec (or anything with the same fields)."""
    from runner.workloads.agents import load_source, pick_device
    from runner.workloads.format_filter import token_counter

    device = pick_device(getattr(spec, "device", "auto"))
    model, tok, desc = load_source(spec, device, log)
    members = [(model, tok)]
    for extra in getattr(spec, "ensemble", []):
        m, t, d = load_source(extra, device, log)
        members.append((m, t))
        desc += f" + {d}"
    a = spec.answer
    if device != "cpu" and getattr(a, "cuda_graphs", False):
        from runner.workloads.cuda_graphs import enable_cuda_graphs

        for m, t in members:
            enable_cuda_graphs(m, t.pad_token_id, log)
    agent = AnswerAgent(members, permutations=a.permutations, deadline_s=a.deadline_s, batch_size=a.batch_size,
                        reasoning=a.reasoning)
    qa = question_agent_from_spec(spec.question, agent, (model, tok), token_counter(tok))
    return agent, qa, desc


def question_agent_from_spec(q: Any, answer_agent: AnswerAgent | None, writer: tuple[Any, Any] | None,
                             count: Any) -> QuestionAgent:
    bank = []
    if q.bank and (q.sources.get("bank", 0) > 0 or any(w.get("bank", 0) > 0 for w in q.per_topic.values())):
        from runner.workloads.data import load_sources

        bank = load_sources(q.bank, seed=q.seed, max_bad_rows=10**9)
    return QuestionAgent(
        topics=q.topics, mix=dict(q.sources), per_topic={k: dict(v) for k, v in q.per_topic.items()}, bank=bank,
        answer_agent=answer_agent, writer=writer, count_tokens=count, prefer_hard=q.prefer_hard,
        time_limit_s=q.time_limit_s, seed=q.seed,
    )


def resolve_token(value: str | None) -> str | None:
    """The bearer token; `${env:X}` left in a job file copied verbatim (the serving image) is read now. Empty: none."""
    if value is None:
        return None
    from runner.spec.loader import ENV_RE

    value = ENV_RE.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    return value or None


def run(job: Any, run_dir: Path) -> int:
    import uvicorn

    spec = job.spec
    srv = spec.server
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    try:
        agent, qagent, desc = build_agents(spec)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", flush=True)
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
        "model": desc, "auth": token is not None, "started": time.time(),
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
    print(f"stopped after answering {batcher.items} questions in {batcher.batches} batches", flush=True)
    code = 130 if any(s in (signal.SIGTERM, signal.SIGINT) for s in signals) else 0
    if not stopped:
        # Leaving a thread inside a native forward pass to interpreter shutdown can abort the process
        # (SIGABRT, no exit code of ours): end now; nothing is left to write.
        print("note: a forward pass was still running at shutdown; not waiting for it", flush=True)
        sys.stderr.flush()
        os._exit(code)
    return code
