"""The HTTP app (FastAPI): endpoints, bearer token, body and prompt size limits, binding. What a request body
must be, and the 4xx replies when it is not, live in bodies.py."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from runner.workloads.agents.answer import AnswerAgent, AnswerItem
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.scoring.prompts import Prompter, strip_choice_prefix
from runner.workloads.serving.batcher import DEADLINE_GRACE_S, MicroBatcher, QueueFull
from runner.workloads.serving.bodies import AnswerBody, JSONBodyRoute, QuestionRequest, install_error_replies
from runner.workloads.serving.metrics import Metrics, RequestMetrics

# Prompt length is checked without the tokenizer where bytes decide it: every token of a byte-level (or
# byte-fallback) vocabulary spans at least one byte, plus a few special tokens; and none spans this many bytes.
SPECIAL_TOKENS_SLACK = 8


MAX_BYTES_PER_TOKEN = 32


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


class BearerAuth:
    """ASGI middleware: a request under `prefix` without the bearer token gets 401 before its body is read."""

    def __init__(self, app: Any, token: str, prefix: str = "/v1/") -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.prefix = prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps({"detail": "missing or wrong bearer token"}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _prompt_bytes(fmt: Prompter, item: AnswerItem) -> int:
    return len(fmt.item_text(item).encode())


def fits_by_bytes(fmt: Prompter, item: AnswerItem, limit: int) -> bool:
    """True when the prompt's byte count alone proves it is at most `limit` tokens."""
    return _prompt_bytes(fmt, item) + SPECIAL_TOKENS_SLACK <= limit


def prompt_length_problem(fmt: Prompter, item: AnswerItem, limit: int) -> str | None:
    """Why an item's prompt (in the agent's prompt style) is over `limit` tokens, or None. Tokenizes only when
    the byte count cannot decide."""
    size = _prompt_bytes(fmt, item)
    if size + SPECIAL_TOKENS_SLACK <= limit:
        return None
    if size > limit * MAX_BYTES_PER_TOKEN:
        return f"question and choices are {size} bytes, far over this service's {limit}-token limit"
    n = len(fmt.encode([item])[0])
    if n > limit:
        return f"question and choices are {n} tokens; this service takes at most {limit}"
    return None


class AnswerResponse(BaseModel):
    answer: str = Field(description="One letter, always one of the question's choices.")
    reasoning: str = Field(description="At most 100 words.")
    confidence: float = Field(description="Probability of the chosen letter.")


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
    install_error_replies(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    # Added last, so outermost: it also counts what BearerAuth and BodyLimit refuse.
    app.add_middleware(RequestMetrics, metrics=metrics,
                       paths=frozenset({"/v1/answer", "/v1/question", "/healthz", "/metrics"}))
    q_lock = threading.Lock()
    api = APIRouter(route_class=JSONBodyRoute)  # the POST endpoints: JSON bodies only

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "queue": batcher.queue.qsize(),
            "batches": batcher.batches,
            "answered": batcher.items,
            "fallbacks": batcher.fallbacks,
            **({"questions": question_agent.stats.as_dict()} if question_agent is not None else {}),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        text = metrics.render(batcher, model_name)
        if question_agent is not None:
            text += "\n".join(question_agent.stats.prometheus_lines()) + "\n"
        return text

    @api.post("/v1/answer")
    async def answer(body: Annotated[AnswerBody, Body()]) -> AnswerResponse | list[AnswerResponse]:
        reqs = body if isinstance(body, list) else [body]
        items = [AnswerItem(r.question.strip(), [strip_choice_prefix(c) for c in r.choices]) for r in reqs]
        # A prompt far past what the model was served for would hold the worker (and everyone queued behind it)
        # for as long as its forward pass takes: refuse it up front. Short prompts are decided by their bytes.
        if not all(fits_by_bytes(answer_agent.prompter, it, max_prompt_tokens) for it in items):
            problems = await run_in_threadpool(
                lambda: [prompt_length_problem(answer_agent.prompter, it, max_prompt_tokens) for it in items]
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

    @api.post("/v1/question")
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
        except RuntimeError as e:  # every source failed its checks: the service cannot, the request is fine
            raise HTTPException(503, f"{e}; the format limits of this service rejected every attempt") from None
        return QuestionResponse(questions=[Question(**q) for q in qs])

    app.include_router(api)
    return app


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
