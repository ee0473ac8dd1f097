"""Request bodies: the media type, JSON decoding that refuses what standard JSON does not allow (NaN, Infinity,
lone surrogates, invalid UTF-8, deep nesting), the request models, and 4xx replies that are always valid JSON."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, ClassVar

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runner.workloads.agents.answer import MAX_DEADLINE_S
from runner.workloads.scoring.prompts import LETTERS, strip_choice_prefix

# Python refuses int("9" * N) past this many digits (a limit since 3.10.7; 4300 is its default).
_MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)()

MAX_DEPTH = 16  # nesting levels a body may have; a request needs 3 (a list of objects holding a list)
MAX_ITEMS = 256  # questions in one answer request
MAX_PROBLEMS = 20  # decoding problems listed in one reply
_SURROGATE = re.compile("[\ud800-\udfff]")


def _problem(kind: str, loc: tuple[str | int, ...], msg: str) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_media_type(content_type: str, content_encoding: str) -> None:
    """415 unless the body is declared as uncompressed UTF-8 JSON (application/json or application/*+json)."""
    media, *params = (p.strip() for p in content_type.split(";"))
    media = media.lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        got = f"content-type {_printable(content_type)!r}" if content_type else "no content-type"
        raise HTTPException(415, f"the body must be JSON: send it with content-type: application/json ({got})")
    for p in params:
        key, _, value = p.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise HTTPException(415, f"the body must be UTF-8 JSON; drop charset={_printable(charset)} or make it utf-8")
    if content_encoding.strip().lower() not in ("", "identity"):
        raise HTTPException(415, f"content-encoding {_printable(content_encoding)!r} is not accepted: "
                                 "send the body uncompressed")


def decode_json(raw: bytes) -> Any:
    """The body as JSON, or RequestValidationError (422) saying where it is not standard JSON."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise RequestValidationError([_problem("body_empty", (), "the request body is empty; send a JSON object")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestValidationError([_problem(
            "utf8_invalid", (), f"the body is not UTF-8: byte {e.start} (0x{raw[e.start]:02x}) is {e.reason}; "
            "send the JSON as UTF-8 text")]) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestValidationError([_problem(
            "json_invalid", (), f"the body is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}")]) from None
    except RecursionError:
        raise RequestValidationError([_problem(
            "json_too_deep", (), f"the JSON is nested too deeply; a request may have at most {MAX_DEPTH} levels")]) from None
    except ValueError:  # an integer past Python's digit limit for int()
        raise RequestValidationError([_problem(
            "number_too_long", (), f"a number in the body has over {_MAX_DIGITS} digits")]) from None
    problems = _scan(value)
    if problems:
        raise RequestValidationError(problems)
    return value


def _scan(value: Any) -> list[dict[str, Any]]:
    """What standard JSON forbids but Python's decoder lets through, each with its place in the body."""
    problems: list[dict[str, Any]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack and len(problems) < MAX_PROBLEMS:
        loc, v = stack.pop()
        if isinstance(v, dict | list):
            if len(loc) >= MAX_DEPTH:
                problems.append(_problem("json_too_deep", loc, f"nested more than {MAX_DEPTH} levels deep; "
                                                               "a request needs 3"))
                continue
            children: list[tuple[tuple[str | int, ...], Any]] = []
            if isinstance(v, list):
                children = [((*loc, i), x) for i, x in enumerate(v)]
            else:
                for k, x in v.items():
                    if _SURROGATE.search(k):
                        problems.append(_problem("string_unicode", loc, f"the key {_printable(k)!r} holds a lone "
                                                 "surrogate, which is not Unicode text; use a valid pair"))
                    else:
                        children.append(((*loc, k), x))
            stack.extend(reversed(children))
        elif isinstance(v, float) and not math.isfinite(v):
            name = "NaN" if math.isnan(v) else ("-Infinity" if v < 0 else "Infinity (or a number too large)")
            problems.append(_problem("finite_number", loc, f"{name} is not a finite number; send a finite one"))
        elif isinstance(v, str) and (m := _SURROGATE.search(v)):
            problems.append(_problem(
                "string_unicode", loc, f"character {m.start()} is a lone surrogate (\\u{ord(m.group()):04x}), "
                "which is not Unicode text; send the character itself or a valid surrogate pair"))
    return problems


class _JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_decoded"):
            self._decoded = decode_json(await self.body())
        return self._decoded


class JSONBodyRoute(APIRoute):
    """A route whose body must be JSON: checked for its media type (415) and decoded by `decode_json` (422)
    before the endpoint's model sees it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            check_media_type(request.headers.get("content-type", ""), request.headers.get("content-encoding", ""))
            strict = _JSONRequest(request.scope, request.receive)
            await strict.json()
            return await handler(strict)

        return route


async def _validation_reply(request: Request, exc: Exception) -> Response:
    """422 listing each problem once as {type, loc, msg}; the offending input is never echoed back."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for e in exc.errors() if isinstance(exc, RequestValidationError) else []:
        loc = [x if isinstance(x, int) else _printable(str(x)) for x in e.get("loc", ())]
        item = {"type": str(e.get("type", "invalid")), "loc": loc, "msg": _printable(str(e.get("msg", "")))}
        key = json.dumps(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return JSONResponse({"detail": out}, status_code=422)


async def _internal_reply(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "internal error; the service's log has the details"}, status_code=500)


def install_error_replies(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_reply)
    app.add_exception_handler(Exception, _internal_reply)


# --- the request models -----------------------------------------------------------------------------------


class _Body(BaseModel):
    # Strict: "5" is not a number and true is not a count; unknown fields are refused, not ignored.
    model_config = ConfigDict(strict=True, extra="forbid")
    shape: ClassVar[str] = "a JSON object"

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise PydanticCustomError("object_type", "expected {expect}", {"expect": cls.shape})
        return data


class AnswerRequest(_Body):
    shape: ClassVar[str] = "a JSON object with 'question' and 'choices'"
    question: str = Field(min_length=1, description="The question text.")
    choices: list[str] = Field(
        min_length=2, max_length=len(LETTERS), description="2-10 choices, with or without 'A) ' prefixes."
    )
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S, allow_inf_nan=False,
                                     description="Answer within this many seconds.")

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


_MANY = Annotated[list[AnswerRequest], Field(min_length=1, max_length=MAX_ITEMS)]
_MANY_ADAPTER: TypeAdapter[list[AnswerRequest]] = TypeAdapter(_MANY)


def _one_or_many(value: Any, handler: Any) -> Any:
    # Validated as the one shape the body has, so each problem is reported once (a plain union reports every
    # problem for both shapes).
    if isinstance(value, list):
        return _MANY_ADAPTER.validate_python(value)
    if isinstance(value, dict):
        return AnswerRequest.model_validate(value)
    raise PydanticCustomError("object_type", "expected a JSON object with 'question' and 'choices', or a list of "
                                             "1-{n} of them", {"n": MAX_ITEMS})


AnswerBody = Annotated[AnswerRequest | _MANY, WrapValidator(_one_or_many)]


class QuestionRequest(_Body):
    shape: ClassVar[str] = "a JSON object with 'topic' and 'n' (both optional)"
    topic: str | None = Field(None, min_length=1, max_length=200,
                              description="Topic; omitted: the agent's topics in turn.")
    n: int = Field(1, ge=1, le=100, description="How many questions.")
