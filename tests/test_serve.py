"""The HTTP service over real loopback sockets, with a tiny real model: formats, micro-batching, 422/503/401,
deadlines that fall back instead of hanging, and the `serve` job end to end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _tiny_lm as tiny
import httpx
import pytest
import torch
import uvicorn

from runner.workloads.agents.answer import AnswerAgent, AnswerItem
from runner.workloads.agents.format_filter import check_answer, check_question, token_counter
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.scoring.prompts import format_prompt
from runner.workloads.serving.app import bind, create_app, prompt_token_limit, url_of
from runner.workloads.serving.batcher import MicroBatcher

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, app: Any) -> None:
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def agent() -> AnswerAgent:
    return AnswerAgent([(tiny.model(), tiny.tokenizer())], deadline_s=6.0)


@pytest.fixture
def service(agent: AnswerAgent) -> Iterator[tuple[str, MicroBatcher]]:
    batcher = MicroBatcher(agent, max_batch=32, window_s=0.004, queue_size=256).start()
    qa = QuestionAgent(answer_agent=agent, count_tokens=token_counter(tiny.tokenizer()))
    with LiveServer(create_app(agent, batcher, qa, model_name="tiny-test")) as srv:
        yield srv.url, batcher
    batcher.stop()


def _valid(i: int, rng: random.Random) -> dict[str, Any]:
    k = rng.randint(2, 10)
    it = tiny.make_items(1, k, seed=i)[0]
    prefixed = rng.random() < 0.5
    choices = [f"{'ABCDEFGHIJ'[j]}) {c}" if prefixed else c for j, c in enumerate(it.choices)]
    return {"question": it.question, "choices": choices}


MALFORMED: list[Any] = [
    {"question": "Which?"},  # no choices
    {"choices": ["a", "b"]},  # no question
    {"question": "Which?", "choices": ["only one"]},
    {"question": "Which?", "choices": [str(i) for i in range(11)]},
    {"question": "", "choices": ["a", "b"]},
    {"question": "Which?", "choices": ["a", 3]},
    {"question": "Which?", "choices": ["A) ", "B) b"]},
    {"question": "Which?", "choices": "a, b"},
    [],
    "not json at all {",
]


def test_1000_requests_at_concurrency_16_with_10_percent_malformed(service: tuple[str, MicroBatcher]) -> None:
    url, batcher = service
    rng = random.Random(0)
    plan: list[tuple[bool, Any]] = []
    for i in range(1000):
        if i % 10 == 3:
            plan.append((False, MALFORMED[(i // 10) % len(MALFORMED)]))
        else:
            plan.append((True, _valid(i, rng)))
    results: list[tuple[bool, Any, int, Any]] = []

    async def drive() -> None:
        it = iter(plan)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def worker() -> None:
                for ok, body in it:
                    if isinstance(body, str):
                        r = await client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
                    else:
                        r = await client.post("/v1/answer", json=body)
                    results.append((ok, body, r.status_code, r.json()))

            await asyncio.gather(*(worker() for _ in range(16)))

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(drive(), timeout=240))
    elapsed = time.monotonic() - t0
    assert len(results) == 1000
    bad_valid = [(b, s, j) for ok, b, s, j in results if ok and s != 200]
    assert bad_valid == []
    for ok, body, status, js in results:
        if ok:
            assert js["answer"] in "ABCDEFGHIJ"[: len(body["choices"])]
            assert check_answer(js, len(body["choices"])) == []
        else:
            assert status == 422, (body, status, js)
            assert js["detail"], "a 422 says what is wrong"
    # concurrent requests shared forward passes
    assert batcher.batches < 900 * 0.7, (batcher.batches, elapsed)


def test_answer_formats_single_list_and_prefixes(service: tuple[str, MicroBatcher]) -> None:
    url, _ = service
    q = {"question": "What is the capital of france?", "choices": ["paris", "rome", "berlin", "madrid"]}
    r = httpx.post(f"{url}/v1/answer", json=q)
    assert r.status_code == 200
    plain = r.json()
    assert set(plain) == {"answer", "reasoning", "confidence"} and plain["answer"] in "ABCD"
    assert 0.25 <= plain["confidence"] <= 1.0
    # 'A) ' prefixes change nothing
    pre = dict(q, choices=[f"{L}) {c}" for L, c in zip("ABCD", q["choices"], strict=True)])
    assert httpx.post(f"{url}/v1/answer", json=pre).json()["answer"] == plain["answer"]
    many = httpx.post(f"{url}/v1/answer", json=[q, pre, dict(q, choices=["yes", "no"])]).json()
    assert len(many) == 3 and many[2]["answer"] in "AB"
    r = httpx.post(f"{url}/v1/answer", json={"question": "Q?", "choices": ["a"]})
    assert r.status_code == 422 and "choices" in json.dumps(r.json()["detail"])
    h = httpx.get(f"{url}/healthz").json()
    assert h["status"] == "ok" and h["model"] == "tiny-test"
    assert httpx.get(f"{url}/openapi.json").json()["paths"].keys() >= {"/v1/answer", "/v1/question", "/healthz"}


def test_question_endpoint_gives_valid_tournament_questions(service: tuple[str, MicroBatcher]) -> None:
    url, _ = service
    r = httpx.post(f"{url}/v1/question", json={"topic": "blood_relations", "n": 3}, timeout=30)
    assert r.status_code == 200
    qs = r.json()["questions"]
    assert len(qs) == 3
    for q in qs:
        assert q["topic"] == "blood_relations" and check_question(q, token_counter(tiny.tokenizer())) == []
    r = httpx.post(f"{url}/v1/question", json={"topic": "astronomy"})
    assert r.status_code == 422 and "astronomy" in r.json()["detail"]


def test_full_queue_gets_503_and_overdue_requests_get_the_fallback(agent: AnswerAgent) -> None:
    # A batcher whose worker never runs: the queue only fills, so every request waits out its deadline.
    batcher = MicroBatcher(agent, queue_size=2)
    with LiveServer(create_app(agent, batcher)) as srv:
        q = {"question": "Which one?", "choices": ["short", "the longest choice here", "mid one"], "deadline_s": 0.5}

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as c:
                return list(await asyncio.gather(*(c.post("/v1/answer", json=q) for _ in range(4))))

        t0 = time.monotonic()
        rs = asyncio.run(fire())
        took = time.monotonic() - t0
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 503, 503]
    full = next(r for r in rs if r.status_code == 503)
    assert full.headers["retry-after"] == "1"
    ok = [r.json() for r in rs if r.status_code == 200]
    assert all(a["answer"] == "B" and "deadline" in a["reasoning"] for a in ok)  # the fallback, not a hang
    assert took < 3.0


def test_a_lone_request_skips_the_batch_window_but_a_busy_service_batches(agent: AnswerAgent) -> None:
    batcher = MicroBatcher(agent, max_batch=32, window_s=0.5).start()
    item = AnswerItem("Which?", ["a", "b", "c"])
    try:
        for _ in range(2):  # idle service: answered without waiting out the 0.5 s window
            t0 = time.monotonic()
            batcher.submit([item], time.monotonic() + 10).result(timeout=10)
            assert time.monotonic() - t0 < 0.4
        # Under load (the last pass was a batch, or others are queued) the window gathers a batch.
        futs = [batcher.submit([item], time.monotonic() + 10) for _ in range(3)]
        for f in futs:
            f.result(timeout=10)
        futs = [batcher.submit([item], time.monotonic() + 10)]
        time.sleep(0.1)
        futs.append(batcher.submit([item], time.monotonic() + 10))
        for f in futs:
            f.result(timeout=10)
        assert batcher.last_batch == 2  # the second request joined the first one's pass inside the window
    finally:
        batcher.stop()


def test_overlong_prompts_get_422_and_huge_bodies_413_without_reaching_the_model(agent: AnswerAgent) -> None:
    batcher = MicroBatcher(agent).start()
    app = create_app(agent, batcher, max_prompt_tokens=256, max_body_bytes=64 << 10)
    short = {"question": "Which?", "choices": ["a", "b"]}
    n_short = len(agent.tokenizer(format_prompt("Which?", ["a", "b"]))["input_ids"])
    try:
        with LiveServer(app) as srv:
            # Decided by the tokenizer (a few hundred words: bytes alone cannot tell) ...
            long_q = {"question": "why " * 300, "choices": ["a", "b"]}
            r = httpx.post(f"{srv.url}/v1/answer", json=long_q, timeout=30)
            assert r.status_code == 422, r.text
            assert "tokens; this service takes at most 256 (server.max_prompt_tokens)" in r.json()["detail"]
            # ... or by bytes alone, and in a list the item is named.
            r = httpx.post(f"{srv.url}/v1/answer", json=[short, {"question": "x" * 20000, "choices": ["a", "b"]}])
            assert r.status_code == 422 and r.json()["detail"].startswith("item 1: question and choices are 2")
            # A prompt at the limit is answered; one token past it is not.
            fill = "why " * 64
            n = len(agent.tokenizer(format_prompt(fill, ["a", "b"]))["input_ids"])
            assert n > n_short
            assert httpx.post(f"{srv.url}/v1/answer", json={"question": fill, "choices": ["a", "b"]}).status_code == 200
            # Bodies: declared too large, and streamed (chunked, no length) too large.
            big = json.dumps([short] * 4000).encode()
            assert len(big) > 64 << 10
            r = httpx.post(f"{srv.url}/v1/answer", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "server.max_body_mb" in r.json()["detail"]
            r = httpx.post(f"{srv.url}/v1/answer", content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]),
                           headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert httpx.post(f"{srv.url}/v1/answer", json=short).status_code == 200  # and the service is fine
        assert batcher.items == 2  # the refused requests never reached the model
    finally:
        batcher.stop()


def _prometheus(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}; every sample line must parse."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def test_metrics_count_requests_latency_and_batches(agent: AnswerAgent) -> None:
    batcher = MicroBatcher(agent).start()
    try:
        with LiveServer(create_app(agent, batcher, model_name='tiny "test"', max_body_bytes=4096)) as srv:
            q = {"question": "Which?", "choices": ["a", "b", "c"]}
            for _ in range(3):
                assert httpx.post(f"{srv.url}/v1/answer", json=q).status_code == 200
            assert httpx.post(f"{srv.url}/v1/answer", json=[q, q]).status_code == 200
            assert httpx.post(f"{srv.url}/v1/answer", json={"question": "Which?"}).status_code == 422
            assert httpx.post(f"{srv.url}/v1/answer", json=[q] * 200).status_code == 413
            assert httpx.get(f"{srv.url}/nowhere").status_code == 404
            r = httpx.get(f"{srv.url}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = _prometheus(r.text)
    finally:
        batcher.stop()
    assert m['qa_info{model="tiny \\"test\\""}'] == 1
    assert m['qa_http_requests_total{path="/v1/answer",code="200"}'] == 4
    assert m['qa_http_requests_total{path="/v1/answer",code="422"}'] == 1
    assert m['qa_http_requests_total{path="/v1/answer",code="413"}'] == 1
    assert m['qa_http_requests_total{path="other",code="404"}'] == 1
    assert m['qa_http_request_seconds_count{path="/v1/answer"}'] == 6
    assert m['qa_http_request_seconds_bucket{path="/v1/answer",le="+Inf"}'] == 6
    assert m['qa_http_request_seconds_sum{path="/v1/answer"}'] > 0
    assert m["qa_answered_total"] == 5 and m["qa_batch_questions_sum"] == 5
    assert m["qa_batch_questions_count"] == m["qa_batches_total"] >= 2
    assert m['qa_batch_questions_bucket{le="1"}'] <= m['qa_batch_questions_bucket{le="2"}'] == m["qa_batches_total"]
    assert m["qa_queue_requests"] == 0 and m["qa_fallbacks_total"] == 0


def test_prompt_limit_never_passes_the_models_positions(agent: AnswerAgent) -> None:
    said: list[str] = []
    positions = agent.members[0][0].config.max_position_embeddings
    assert prompt_token_limit(agent, positions + 1000, said.append) == positions
    assert f"prompts are limited to {positions} tokens" in said[0]
    assert prompt_token_limit(agent, 64, said.append) == 64 and len(said) == 1


def test_stop_says_whether_a_running_pass_finished() -> None:
    started = threading.Event()

    class Slow:
        def answer_many(self, items: list[AnswerItem], deadline: float) -> list[dict[str, Any]]:
            started.set()
            time.sleep(1.5)
            return [{"answer": "A", "reasoning": "", "confidence": 1.0} for _ in items]

    batcher = MicroBatcher(Slow()).start()  # type: ignore[arg-type]
    batcher.submit([AnswerItem("Which?", ["a", "b"])], time.monotonic() + 10)
    assert started.wait(5)
    assert batcher.stop(timeout=0.2) is False  # the pass is still running: the service exits without it
    assert batcher.stop(timeout=5) is True
    assert MicroBatcher(Slow()).start().stop() is True  # type: ignore[arg-type]


def test_bearer_token(agent: AnswerAgent) -> None:
    batcher = MicroBatcher(agent).start()
    with LiveServer(create_app(agent, batcher, token="s3cret")) as srv:
        q = {"question": "Which?", "choices": ["a", "b"]}
        assert httpx.post(f"{srv.url}/v1/answer", json=q).status_code == 401
        assert httpx.post(f"{srv.url}/v1/answer", json=q, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(f"{srv.url}/v1/answer", json=q, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    batcher.stop()


@pytest.mark.slow
def test_serve_job_answers_curl_and_writes_serve_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = (ROOT / "jobs" / "serve.yaml").read_text()
    assert "max_prompt_tokens: 2048" in job
    (run_dir / "job.yaml").write_text(job.replace("max_prompt_tokens: 2048", "max_prompt_tokens: 512"))
    env = dict(os.environ, RUNNER_RUN_DIR=str(run_dir), QA_TOKEN="tok123")
    proc = subprocess.Popen([sys.executable, "-m", "runner.workloads"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if (run_dir / "serve.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.5)
        info = json.loads((run_dir / "serve.json").read_text())
        assert info["url"].startswith("http://127.0.0.1:")
        for _ in range(100):
            try:
                httpx.get(f"{info['url']}/healthz")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        out = subprocess.run(
            ["curl", "-s", "-H", "Authorization: Bearer tok123", "-H", "content-type: application/json", "-d",
             '{"question": "2 + 2 = ?", "choices": ["A) 3", "B) 4", "C) 5", "D) 22"]}', f"{info['url']}/v1/answer"],
            capture_output=True, text=True, timeout=30,
        )
        ans = json.loads(out.stdout)
        assert ans["answer"] in "ABCD" and check_answer(ans) == []
        # The job's size limit reaches the service.
        long_q = {"question": "why " * 600, "choices": ["a", "b"]}
        r = httpx.post(f"{info['url']}/v1/answer", json=long_q, headers={"Authorization": "Bearer tok123"}, timeout=30)
        assert r.status_code == 422 and "at most 512 (server.max_prompt_tokens)" in r.json()["detail"]
        proc.terminate()
        assert proc.wait(timeout=30) == 130  # cancelled by SIGTERM
        log = proc.stdout.read() if proc.stdout else ""
        assert f"at {info['url']}" in log
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_runner_show_names_a_detached_services_url() -> None:
    from runner.runs import RunStore
    from tests.conftest import run_cli

    job = ROOT / "jobs" / "serve.yaml"
    run_cli("run", str(job), "--detach", check=True, env={"QA_TOKEN": "t0k"})
    run = RunStore().get("serve")
    try:
        for _ in range(240):
            if (run.dir / "serve.json").exists() or run.state not in ("pending", "running"):
                break
            time.sleep(0.5)
        url = json.loads((run.dir / "serve.json").read_text())["url"]
        show = run_cli("show", "serve", check=True).stdout
        assert f"serving    {url}  (POST /v1/answer" in show and "needs its bearer token" in show, show
    finally:
        run_cli("cancel", "serve", check=True)
    assert f"served     {url} (stopped)" in run_cli("show", "serve", check=True).stdout
