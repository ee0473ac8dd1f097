"""Hostile requests to the agents' HTTP service over a real loopback socket: non-finite numbers, lone surrogates,
wrong types and shapes, wrong content types, bodies that are not JSON or not UTF-8, deep nesting, wrong methods
and paths, and a seeded fuzz of both POST endpoints. Each gets a 4xx whose body is JSON, never a 500."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_serve import LiveServer, agent  # noqa: F401  (agent: the module's tiny answer agent fixture)

from runner.workloads.agents.answer import AnswerAgent
from runner.workloads.agents.format_filter import token_counter
from runner.workloads.agents.question import QuestionAgent
from runner.workloads.serving.app import create_app
from runner.workloads.serving.batcher import MicroBatcher

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON_CT = {"content-type": "application/json"}
BODY_LIMIT = 256 << 10
VALID_ANSWER = {"question": "Which is largest?", "choices": ["one", "two", "three"], "deadline_s": 5.0}
VALID_QUESTION = {"topic": "blood_relations", "n": 1}


@pytest.fixture(scope="module")
def url(agent: AnswerAgent) -> Iterator[str]:  # noqa: F811
    import _tiny_lm as tiny

    batcher = MicroBatcher(agent).start()
    # Topics the tiny tokenizer can fit inside the tournament's token limits.
    qa = QuestionAgent(answer_agent=agent, topics=("seating_linear", "blood_relations"),
                       count_tokens=token_counter(tiny.tokenizer()))
    app = create_app(agent, batcher, qa, token=TOKEN, model_name="tiny-test", max_body_bytes=BODY_LIMIT)
    with LiveServer(app) as srv:
        yield srv.url
    batcher.stop()


def _strict_json(content: bytes) -> Any:
    """The body as standard JSON: no NaN/Infinity, no lone surrogates, valid UTF-8."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    value = json.loads(content.decode("utf-8"), parse_constant=no_constants)
    json.dumps(value, allow_nan=False).encode("utf-8")  # raises on a lone surrogate or a non-finite float
    return value


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers={**AUTH, **JSON_CT, **(headers or {})}, timeout=10)


def _errors(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 422, (r.status_code, r.text[:500])
    detail = _strict_json(r.content)["detail"]
    assert isinstance(detail, list) and detail
    for e in detail:
        assert set(e) == {"type", "loc", "msg"}, e  # the offending input is never echoed back
        assert e["loc"][0] == "body" and e["msg"]
    return detail


@pytest.mark.parametrize(("path", "body", "loc"), [
    ("/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": NaN}', ["body", "deadline_s"]),
    ("/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": Infinity}', ["body", "deadline_s"]),
    ("/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": -Infinity}', ["body", "deadline_s"]),
    ("/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": 1e999}', ["body", "deadline_s"]),
    ("/v1/answer", b'[{"question": "Q?", "choices": ["a", "b"]}, {"question": "Q?", "choices": ["a", "b"], '
                   b'"deadline_s": NaN}]', ["body", 1, "deadline_s"]),
    ("/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "x": {"y": [NaN]}}', ["body", "x", "y", 0]),
    ("/v1/question", b'{"n": NaN}', ["body", "n"]),
    ("/v1/question", b'{"topic": Infinity}', ["body", "topic"]),
], ids=["nan", "infinity", "minus-infinity", "overflow", "in-a-list", "nested-extra", "count", "topic"])
def test_non_finite_numbers_get_422_with_a_json_body(url: str, path: str, body: bytes, loc: list[Any]) -> None:
    errors = _errors(_post(url, path, body))
    assert [e["loc"] for e in errors] == [loc]
    assert "finite" in errors[0]["msg"]


@pytest.mark.parametrize(("path", "body", "loc"), [
    ("/v1/answer", b'{"question": "Which \\ud800?", "choices": ["a", "b"]}', ["body", "question"]),
    ("/v1/answer", b'{"question": "Which?", "choices": ["a", "b\\udfff"]}', ["body", "choices", 1]),
    ("/v1/answer", b'[{"question": "Q?", "choices": ["a", "b"]}, {"question": "\\udc00", "choices": ["a", "b"]}]',
     ["body", 1, "question"]),
    ("/v1/question", b'{"topic": "blood\\ud83d"}', ["body", "topic"]),
], ids=["question", "choice", "in-a-list", "topic"])
def test_lone_surrogates_get_422_naming_the_field(url: str, path: str, body: bytes, loc: list[Any]) -> None:
    errors = _errors(_post(url, path, body))
    assert [e["loc"] for e in errors] == [loc]
    assert "surrogate" in errors[0]["msg"]


def test_a_lone_surrogate_in_a_key_or_as_raw_bytes_is_422(url: str) -> None:
    errors = _errors(_post(url, "/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "\\ud800": 1}'))
    assert len(errors) == 1 and "surrogate" in errors[0]["msg"]
    # The surrogate encoded straight into the bytes (CESU-8) is not UTF-8 at all.
    raw = json.dumps({"question": "Q\ud800?", "choices": ["a", "b"]}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    errors = _errors(_post(url, "/v1/answer", raw))
    assert errors[0]["type"] == "utf8_invalid" and "UTF-8" in errors[0]["msg"]


def test_each_validation_error_is_listed_once_with_its_location(url: str) -> None:
    errors = _errors(_post(url, "/v1/answer", b'{"question": "Q?"}'))
    assert [(e["type"], e["loc"]) for e in errors] == [("missing", ["body", "choices"])]
    errors = _errors(_post(url, "/v1/answer", b'{"question": "", "choices": ["a"], "deadline_s": -1}'))
    assert sorted(tuple(e["loc"]) for e in errors) == [("body", "choices"), ("body", "deadline_s"), ("body", "question")]
    errors = _errors(_post(url, "/v1/answer", b'[{"question": "Q?", "choices": ["a", "b"]}, {"question": "Q?"}]'))
    assert [e["loc"] for e in errors] == [["body", 1, "choices"]]
    for body in (b'"a string"', b"42", b"null", b"true"):
        errors = _errors(_post(url, "/v1/answer", body))
        assert len(errors) == 1 and errors[0]["loc"] == ["body"], errors
        assert "JSON object" in errors[0]["msg"]
    errors = _errors(_post(url, "/v1/question", b'["blood_relations"]'))
    assert len(errors) == 1 and errors[0]["loc"] == ["body"] and "JSON object" in errors[0]["msg"]


MALFORMED: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    # (name, path, body, headers over the JSON content type, status, words the reply says)
    ("text content type", "/v1/answer", json.dumps(VALID_ANSWER).encode(), {"content-type": "text/plain"}, 415,
     "application/json"),
    ("form content type", "/v1/question", b"topic=x", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    ("no content type", "/v1/answer", json.dumps(VALID_ANSWER).encode(), {"content-type": ""}, 415,
     "application/json"),
    ("utf-16 charset", "/v1/answer", json.dumps(VALID_ANSWER).encode("utf-16"),
     {"content-type": "application/json; charset=utf-16"}, 415, "UTF-8"),
    ("compressed", "/v1/answer", b"\x1f\x8b\x08\x00", {"content-encoding": "gzip"}, 415, "uncompressed"),
    ("not JSON", "/v1/answer", b"not json {", {}, 422, "not valid JSON"),
    ("truncated JSON", "/v1/answer", b'{"question": "Q?", "choi', {}, 422, "line 1"),
    ("trailing data", "/v1/answer", json.dumps(VALID_ANSWER).encode() + b" x", {}, 422, "not valid JSON"),
    ("empty body", "/v1/answer", b"", {}, 422, "empty"),
    ("empty question body", "/v1/question", b"", {}, 422, "empty"),
    ("array of numbers", "/v1/answer", b"[1, 2]", {}, 422, "JSON object"),
    ("empty array", "/v1/answer", b"[]", {}, 422, "at least 1"),
    ("257 items", "/v1/answer", json.dumps([VALID_ANSWER] * 257).encode(), {}, 422, "at most 256"),
    ("string body", "/v1/question", b'"blood_relations"', {}, 422, "JSON object"),
    ("huge int", "/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": ' + b"9" * 5000 + b"}", {}, 422,
     "digits"),
    ("big int", "/v1/question", b'{"n": ' + b"9" * 400 + b"}", {}, 422, "less than or equal to 100"),
    ("deep nesting", "/v1/answer", b"[" * 100_000 + b"]" * 100_000, {}, 422, "nested"),
    ("nested extra", "/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "x": ' + b"[" * 40 + b"]" * 40 + b"}", {},
     422, "nested"),
    ("nulls", "/v1/answer", b'{"question": null, "choices": null}', {}, 422, "valid string"),
    ("null choice", "/v1/answer", b'{"question": "Q?", "choices": ["a", null]}', {}, 422, "valid string"),
    ("extra field", "/v1/answer", json.dumps(dict(VALID_ANSWER, answer="A")).encode(), {}, 422, "not permitted"),
    ("extra question field", "/v1/question", b'{"n": 1, "count": 2}', {}, 422, "not permitted"),
    ("invalid UTF-8", "/v1/answer", b'{"question": "Q\xff\xfe?", "choices": ["a", "b"]}', {}, 422, "UTF-8"),
    ("raw NUL", "/v1/answer", b'{"question": "Q\x00?", "choices": ["a", "b"]}', {}, 422, "not valid JSON"),
    ("number as string", "/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": "5"}', {}, 422,
     "valid number"),
    ("bool as number", "/v1/answer", b'{"question": "Q?", "choices": ["a", "b"], "deadline_s": true}', {}, 422,
     "valid number"),
    ("bool as count", "/v1/question", b'{"n": true}', {}, 422, "valid integer"),
    ("choices as string", "/v1/answer", b'{"question": "Q?", "choices": "a, b"}', {}, 422, "valid list"),
    ("long topic", "/v1/question", json.dumps({"topic": "t" * 5000}).encode(), {}, 422, "at most"),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "says"),
                         [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_get_a_4xx_that_says_what_is_wrong(url: str, path: str, body: bytes, headers: dict[str, str],
                                                            status: int, says: str) -> None:
    h = {**AUTH, **JSON_CT, **headers}
    h = {k: v for k, v in h.items() if v}
    t0 = time.monotonic()
    r = httpx.post(f"{url}{path}", content=body, headers=h, timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json"
    reply = _strict_json(r.content)
    assert "Traceback" not in r.text
    assert says in json.dumps(reply["detail"]), reply
    if status == 422 and isinstance(reply["detail"], list):
        _errors(r)


def test_wrong_methods_and_unknown_paths_get_json_4xx(url: str) -> None:
    for method, path, status in [("GET", "/v1/answer", 405), ("PUT", "/v1/answer", 405), ("DELETE", "/v1/question", 405),
                                 ("PATCH", "/v1/question", 405), ("POST", "/healthz", 405), ("POST", "/metrics", 405),
                                 ("GET", "/nowhere", 404), ("POST", "/v1/nowhere", 404), ("GET", "/%ED%A0%80", 404)]:
        r = httpx.request(method, f"{url}{path}", headers=AUTH, timeout=10)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert _strict_json(r.content)["detail"]


def test_the_token_is_checked_before_the_body_is_read(url: str) -> None:
    for body, headers in [(b"not json", JSON_CT), (b'{"n": NaN}', JSON_CT), (b"x", {"content-type": "text/plain"})]:
        r = httpx.post(f"{url}/v1/question", content=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in _strict_json(r.content)["detail"]
    r = httpx.post(f"{url}/v1/nowhere", content=b"{}", headers=JSON_CT, timeout=10)
    assert r.status_code == 401


def test_valid_requests_still_work_alongside(url: str) -> None:
    r = _post(url, "/v1/answer", json.dumps(VALID_ANSWER).encode())
    assert r.status_code == 200 and r.json()["answer"] in "ABC"
    # +json media types, a charset of utf-8 and a BOM are all plain JSON
    r = _post(url, "/v1/answer", b"\xef\xbb\xbf" + json.dumps([VALID_ANSWER]).encode(),
              {"content-type": "application/vnd.qa+json; charset=UTF-8"})
    assert r.status_code == 200 and len(r.json()) == 1
    # an integer deadline is a number
    r = _post(url, "/v1/answer", json.dumps(dict(VALID_ANSWER, deadline_s=5)).encode())
    assert r.status_code == 200
    r = _post(url, "/v1/question", json.dumps(VALID_QUESTION).encode())
    assert r.status_code == 200 and r.json()["questions"][0]["topic"] == "blood_relations"


# --- fuzz ----------------------------------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 0.0, -0.0, 1.5, 1e-320, 10**30, -(10**30), float("nan"), float("inf"), float("-inf"),
    "", " ", "\t\n", "\x00", "a\x00b", "\ud800", "x\udfffy", "\U0001f600", "é" * 300, "A) ", "A)", "[]", "{}", "null",
    [], [None], [1, 2], ["a"], ["a", 1], [["a", "b"]], [""] * 3, ["\ud800", "b"], ["x"] * 11, {}, {"a": 1},
    {"question": "Q?"}, [float("nan")], "\u202e\u0000\ufeff",
]


def _hostile_value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.08:
        return "w " * rng.choice([2000, 50_000, 200_000])  # oversized strings: prompt limit or body limit
    if roll < 0.14:
        d = rng.choice([20, 40, 900, 5000])
        return json.loads("[" * min(d, 900) + "]" * min(d, 900)) if d <= 900 else {"deep": d}
    if roll < 0.18:
        return "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randint(1, 40)))
    return rng.choice(HOSTILE_VALUES)


def _mutate_object(base: dict[str, Any], rng: random.Random) -> Any:
    d = dict(base)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        key = rng.choice(list(base))
        if op < 0.55:
            d[key] = _hostile_value(rng)
        elif op < 0.7:
            d.pop(key, None)
        elif op < 0.85:
            d[rng.choice(["extra", "", "\ud800", "answer", key.upper(), "__proto__"])] = _hostile_value(rng)
        elif op < 0.95 and key == "choices" and isinstance(d.get(key), list) and d[key]:
            d[key] = list(d[key])
            d[key][rng.randrange(len(d[key]))] = _hostile_value(rng)
        else:
            d = _hostile_value(rng)  # the whole body replaced by a value of another type
            break
    return d


def _encode(value: Any, rng: random.Random) -> bytes:
    if isinstance(value, dict) and "deep" in value and len(value) == 1:
        n = value["deep"]
        return b'{"question": "Q?", "choices": ' + b"[" * n + b'"a"' + b"]" * n + b"}"
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)  # NaN and Infinity come out as their literals
    raw = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.1 and raw:
        raw = raw[: rng.randrange(len(raw))]  # truncated
    elif roll < 0.18 and raw:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1 :]  # one byte flipped
    elif roll < 0.22:
        i = rng.randrange(len(raw) + 1)
        raw = raw[:i] + rng.choice([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b",", b"}", b"NaN"]) + raw[i:]
    elif roll < 0.25:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4096)))  # random bytes
    elif roll < 0.27:
        raw = b"\xef\xbb\xbf" + raw
    return raw


def _request(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    if rng.random() < 0.6:
        path = "/v1/answer"
        base = dict(VALID_ANSWER, question=f"Which one {rng.randrange(1000)}?")
        value = _mutate_object(base, rng)
        if rng.random() < 0.25:
            value = [dict(VALID_ANSWER)] * rng.choice([0, 1, 3, 257]) + [value]
    else:
        path = "/v1/question"
        value = _mutate_object(VALID_QUESTION, rng)
    headers = dict(AUTH, **JSON_CT)
    roll = rng.random()
    if roll < 0.05:
        headers["content-type"] = rng.choice(["text/plain", "application/xml", "application/json; charset=latin-1",
                                              "multipart/form-data; boundary=x", "application/", ";;"])
    elif roll < 0.08:
        del headers["content-type"]
    elif roll < 0.1:
        headers["authorization"] = rng.choice(["Bearer", "Bearer nope", "Basic abc", "bearer " + TOKEN, ""])
    return path, _encode(value, rng), headers


def test_seeded_fuzz_of_both_post_endpoints_never_gets_a_5xx(url: str) -> None:
    rng = random.Random(20240607)
    plan = [_request(rng) for _ in range(1200)]
    assert {p for p, _, _ in plan} == {"/v1/answer", "/v1/question"}
    results: list[tuple[int, float, bytes, str, bytes]] = []

    async def drive() -> None:
        queue = iter(plan)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async def worker() -> None:
                for path, body, headers in queue:
                    t0 = time.monotonic()
                    r = await client.post(path, content=body, headers=headers)
                    results.append((r.status_code, time.monotonic() - t0, r.content, path, body))

            await asyncio.gather(*(worker() for _ in range(4)))

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(drive(), timeout=90))
    assert time.monotonic() - t0 < 60
    assert len(results) == len(plan)
    for status, took, content, path, body in results:
        where = f"{path} {body[:200]!r} -> {status} {content[:300]!r}"
        assert status < 500, where
        assert took < 1.0, f"{took:.2f} s: {where}"
        reply = _strict_json(content)
        assert "Traceback" not in content.decode(), where
        if status >= 400:
            assert reply["detail"], where
    codes = {s for s, *_ in results}
    assert {401, 413, 415, 422} <= codes, codes
    assert sum(s == 422 for s, *_ in results) > len(plan) // 2
    # and the service still answers
    r = _post(url, "/v1/answer", json.dumps(VALID_ANSWER).encode())
    assert r.status_code == 200 and r.json()["answer"] in "ABC"


def test_a_question_no_source_can_write_within_the_limits_is_503_not_500(agent: AnswerAgent) -> None:  # noqa: F811
    from runner.workloads.agents.format_filter import FormatLimits

    batcher = MicroBatcher(agent).start()
    qa = QuestionAgent(answer_agent=agent, topics=("blood_relations",), limits=FormatLimits(question_tokens=3))
    app = create_app(agent, batcher, qa, token=TOKEN, model_name="tiny-test", max_body_bytes=BODY_LIMIT)
    try:
        with LiveServer(app) as srv:
            r = _post(srv.url, "/v1/question", json.dumps(VALID_QUESTION).encode())
    finally:
        batcher.stop()
    assert r.status_code == 503, (r.status_code, r.text)
    assert "could not write a valid question" in _strict_json(r.content)["detail"]
