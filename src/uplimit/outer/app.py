"""The OpenAI-compatible HTTP layer: translate requests to `OuterService` calls and back.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
GET /health, and POST /v1/uplimit/withheld (an operator asks for withheld reasoning; it is
uploaded like any answer, so it is charged to the budget).

Supported parameters: model, messages / prompt, temperature, top_p, max_tokens
(max_completion_tokens), stop, seed, n, stream (+ stream_options.include_usage), and two
extensions: top_k, best_of (candidates generated inside per choice; only the best is
uploaded). Parameters that would change the output but are not implemented (logprobs, tools,
penalties, logit_bias, ...) are refused rather than ignored.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and are mapped in
one place (`_ERRORS`, `_api_error`):

    400 invalid_request_error  invalid_value            a parameter out of range or unsupported
    400 invalid_request_error  context_length_exceeded  prompt + max_tokens exceed the context
    401 authentication_error   invalid_api_key
    404 invalid_request_error  model_not_found
    503 server_error           upload_budget_exhausted  the link's budget is spent
    503 server_error           inner_unreachable        the link is not serving

Each response carries an `uplimit` object: the request's seed, and per choice the uplink bits
it cost (its share of every frame, and of that its tokens' own code: `payload_bits`), its
tokens, and, when reasoning is kept inside, its withheld-reasoning id and withheld token count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from uplimit.coding.generate import Finish
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, InvalidRequest, LinkClosed, UplimitError
from uplimit.outer.rollout import Rollout, RolloutBusy
from uplimit.outer.service import Choice, Finished, OuterService, PromptTooLong, Submission
from uplimit.outer.status import StatusBoard
from uplimit.outer.status_page import add_status_routes
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import MAX_STOPS, withheld_id

__all__ = ["ApiSettings", "create_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiSettings:
    model_name: str = "uplimit"
    api_key: str | None = None  # clients must send it as a bearer token when set
    max_best_of: int = 8
    reasoning: bool = False  # the inner keeps reasoning inside: responses carry withheld ids
    admin_key: str | None = None  # bearer token of /admin/*; None: no admin API (404)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param,
        )  # fmt: skip


# --- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    # Unknown fields are accepted (clients send many); the ones that matter are refused below.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]


class _ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class _CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class _WithheldBody(BaseModel):
    id: str = Field(min_length=1, max_length=200)


class _RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weak: str = Field(min_length=1, max_length=4096)  # a GGUF file on the outer's host
    calibration: str = Field(min_length=1, max_length=4096)  # its calibration JSON


# Fields that would change the answer: refused unless absent or at their no-op value.
_UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_value", param)


def _check_extras(body: _Body) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
            raise _invalid(f"{name} is not supported by this server", name)


def _params(body: _Body) -> SamplingParams:
    t = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = body.top_k or 0
    for name, ok in (
        ("temperature", 0.0 <= t <= 2.0),
        ("top_p", 0.0 < top_p <= 1.0),
        ("top_k", top_k >= 0),
    ):
        if not ok:
            raise _invalid(f"{name} is out of range", name)
    return SamplingParams(t, top_p, top_k)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS or not all(stops):
        raise _invalid(f"stop takes 1..{MAX_STOPS} non-empty strings", "stop")
    return stops


# --- the app ----------------------------------------------------------------------------------


def create_app(
    service: OuterService,
    settings: ApiSettings,
    rollout: Rollout | None = None,
    status: StatusBoard | None = None,
) -> FastAPI:
    """The OpenAI-compatible API; with `settings.admin_key` and a `rollout`, also
    `POST /admin/rollout` (start one) and `GET /admin/rollout` (its status); with a `status`
    board, `GET /status` and `/status.json` (behind the admin key when one is set)."""
    app = FastAPI(title="uplimit", docs_url=None, redoc_url=None)
    if status is not None:
        add_status_routes(app, status, settings.admin_key)
    model = service.model

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(UplimitError)
    async def _on_uplimit_error(request: Request, e: UplimitError) -> JSONResponse:
        return _error_response(_api_error(e, service))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error_response(_invalid(f"{param or 'body'}: {first.get('msg', 'invalid')}", param))

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        if request.url.path.startswith("/admin/"):
            if settings.admin_key is None or rollout is None:
                return _error_response(ApiError(404, "no admin API here", "not_found", None))
            if not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {settings.admin_key}"
            ):
                e = ApiError(401, "invalid admin key", "authentication_error", "invalid_api_key")
                return _error_response(e)
            return await call_next(request)
        wanted = f"Bearer {settings.api_key}"
        if (
            settings.api_key
            and request.url.path.startswith("/v1/")
            and request.headers.get("authorization") != wanted
        ):
            e = ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
            return _error_response(e)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {settings.model_name!r}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    def check_common(body: _Body) -> tuple[SamplingParams, tuple[str, ...], int]:
        check_model(body.model)
        _check_extras(body)
        params = _params(body)
        if not 1 <= body.n <= service.max_choices:
            raise _invalid(f"n must be in 1..{service.max_choices}", "n")
        best_of = body.best_of or 1
        if not 1 <= best_of <= settings.max_best_of:
            raise _invalid(f"best_of must be in 1..{settings.max_best_of}", "best_of")
        return params, _stops(body.stop), best_of

    async def submit(body: _Body, prompt: list[int], max_tokens: int | None, id_: str):
        params, stops, best_of = check_common(body)
        if max_tokens is not None and max_tokens < 1:
            raise _invalid("max_tokens must be >= 1", "max_tokens")
        return await service.submit(
            prompt, params, request_id=id_, max_tokens=max_tokens, stop=stops,
            seed=body.seed, n=body.n, best_of=best_of,
        )  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return _model_card(name)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = service.state is LinkState.SERVING
        body = {"link": service.state.value, "reason": service.uplink.reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/v1/chat/completions")
    async def chat(body: _ChatBody) -> Any:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _content(m)}
            for m in body.messages
        ]
        try:
            prompt = model.chat_tokens(messages)
        except InvalidRequest as e:
            raise _invalid(str(e), "messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        sub = await submit(body, prompt, max_tokens, f"chatcmpl-{uuid.uuid4().hex[:24]}")
        if body.stream:
            return _sse(_chunks(_CHAT, sub, body, settings, service))
        return await _response(_CHAT, sub, body, settings, service)

    @app.post("/v1/completions")
    async def completions(body: _CompletionBody) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise _invalid("one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = model.tokenize(prompt)
        else:
            ids = list(prompt)
            if not all(0 <= t < model.info.n_vocab for t in ids):
                raise _invalid("a prompt token id is outside the vocabulary", "prompt")
        if not ids:
            raise _invalid("the prompt is empty", "prompt")
        sub = await submit(body, ids, body.max_tokens or 16, f"cmpl-{uuid.uuid4().hex[:24]}")
        if body.stream:
            return _sse(_chunks(_COMPLETION, sub, body, settings, service))
        return await _response(_COMPLETION, sub, body, settings, service)

    @app.post("/v1/uplimit/withheld")
    async def withheld(body: _WithheldBody) -> dict:
        """An operator asks for reasoning that stayed inside; it is uploaded and charged."""
        if not settings.reasoning:
            raise _invalid("this server does not keep reasoning inside", "id")
        sub = await service.retrieve(body.id)
        (choice,) = sub.choices
        text, finished = await _collect(choice)
        return {
            "id": body.id,
            "text": text,
            "tokens": finished.tokens,
            "uplimit": {"uploaded_bits": finished.bits},
        }

    @app.post("/admin/rollout", status_code=202)
    async def start_rollout(body: _RolloutBody) -> dict:
        """Send a new weak model down and switch to it (outer/rollout.py)."""
        assert rollout is not None  # the middleware answers 404 without one
        try:
            return rollout.start(body.weak, body.calibration).as_dict()
        except RolloutBusy as e:
            raise ApiError(409, str(e), "invalid_request_error", "rollout_busy") from e
        except ConfigError as e:
            raise _invalid(str(e), "weak") from e

    @app.get("/admin/rollout")
    async def rollout_status() -> dict:
        assert rollout is not None
        return rollout.status.as_dict()

    return app


def _content(m: _Message) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "uplimit"}


# --- errors -----------------------------------------------------------------------------------


def _error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


def _api_error(e: UplimitError, service: OuterService) -> ApiError:
    """The one mapping from uplimit's errors to HTTP: the client's input is a 400, the link's
    state a 503, and anything else our fault, a 500 with its cause in the log."""
    if isinstance(e, PromptTooLong):
        return ApiError(400, str(e), "invalid_request_error", "context_length_exceeded", "messages")
    if isinstance(e, InvalidRequest):
        return _invalid(str(e), None)
    if isinstance(e, LinkClosed) and service.state is LinkState.EXHAUSTED:
        return ApiError(503, "upload budget exhausted", "server_error", "upload_budget_exhausted")
    if isinstance(e, LinkClosed):
        message = f"the inner side is unreachable ({service.uplink.reason})"
        return ApiError(503, message, "server_error", "inner_unreachable")
    log.error("internal error answering a request: %r", e, exc_info=e)
    return ApiError(500, f"internal error: {e}", "server_error", None)


def _link_error(finished: Finished, service: OuterService) -> ApiError:
    return _api_error(LinkClosed(finished.error), service)


# --- responses --------------------------------------------------------------------------------


async def _collect(choice: Choice) -> tuple[str, Finished]:
    parts = []
    while True:
        event = await choice.events.get()
        if isinstance(event, Finished):
            return "".join(parts), event
        parts.append(event)


def _usage(sub: Submission, finished: Sequence[Finished]) -> dict:
    completion = sum(f.tokens for f in finished)
    return {
        "prompt_tokens": sub.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": sub.prompt_tokens + completion,
    }


def _choice_extra(sub: Submission, index: int, f: Finished, settings: ApiSettings) -> dict:
    extra = {
        "uploaded_bits": round(f.bits, 3),
        "payload_bits": round(f.payload_bits, 3),
        "tokens": f.tokens,
    }
    if f.tokens:
        extra["bits_per_token"] = round(f.bits / f.tokens, 4)
    if settings.reasoning:
        extra["withheld_id"] = withheld_id(sub.request_id, sub.choices[index].stream_id)
        extra["withheld_tokens"] = f.withheld
    return extra


def _extra(sub: Submission, finished: Sequence[Finished], settings: ApiSettings) -> dict:
    return {
        "seed": sub.seed,
        "uploaded_bits": round(sum(f.bits for f in finished), 3),
        "choices": [_choice_extra(sub, i, f, settings) for i, f in enumerate(finished)],
    }


async def _gather(sub: Submission, service: OuterService) -> list[tuple[str, Finished]]:
    try:
        results = await asyncio.gather(*(_collect(c) for c in sub.choices))
    except asyncio.CancelledError:
        for c in sub.choices:
            await service.cancel(c)
        raise
    for _, f in results:
        if f.reason is Finish.ERROR:
            raise _link_error(f, service)
    return list(results)


@dataclass(frozen=True)
class _Shape:
    """What differs between chat completions and completions; the builders below share the rest."""

    object: str
    chunk_object: str
    chat: bool

    def content(self, text: str) -> dict:
        """A whole choice's text."""
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}

    def delta(self, text: str) -> dict:
        """A chunk's text ("" on a choice's last chunk)."""
        if self.chat:
            return {"delta": {"content": text} if text else {}}
        return {"text": text}


_CHAT = _Shape("chat.completion", "chat.completion.chunk", chat=True)
_COMPLETION = _Shape("text_completion", "text_completion", chat=False)


async def _response(
    shape: _Shape, sub: Submission, body: _Body, settings: ApiSettings, service: OuterService
) -> dict:
    results = await _gather(sub, service)
    finished = [f for _, f in results]
    return {
        "id": sub.request_id,
        "object": shape.object,
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": i,
                **shape.content(text),
                "finish_reason": f.reason.openai,
                "logprobs": None,
            }
            for i, (text, f) in enumerate(results)
        ],
        "usage": _usage(sub, finished),
        "uplimit": _extra(sub, finished, settings),
    }


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _events(sub: Submission, service: OuterService) -> AsyncIterator[tuple[int, Any]]:
    """Every choice's events, interleaved as they come; cancels the rest if the client goes."""
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        while True:
            event = await sub.choices[i].events.get()
            await merged.put((i, event))
            if isinstance(event, Finished):
                return

    tasks = [asyncio.create_task(pump(i)) for i in range(len(sub.choices))]
    left = len(sub.choices)
    try:
        while left:
            i, event = await merged.get()
            left -= isinstance(event, Finished)
            yield i, event
    finally:
        for t in tasks:
            t.cancel()
        for c in sub.choices:
            await service.cancel(c)  # a no-op for a choice whose stream has ended


def _stream_error(finished: Finished, service: OuterService) -> dict:
    e = _link_error(finished, service)
    return {"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}}


async def _chunks(
    shape: _Shape, sub: Submission, body: _Body, settings: ApiSettings, service: OuterService
) -> AsyncIterator[dict]:
    created = int(time.time())

    def chunk(i: int, content: dict, finish: str | None = None, **extra: Any) -> dict:
        return {
            "id": sub.request_id,
            "object": shape.chunk_object,
            "created": created,
            "model": body.model,
            "choices": [{"index": i, **content, "finish_reason": finish, "logprobs": None}],
            **extra,
        }

    if shape.chat:  # each chat choice opens with its role
        for i in range(len(sub.choices)):
            yield chunk(i, {"delta": {"role": "assistant", "content": ""}})
    finished: dict[int, Finished] = {}
    async for i, event in _events(sub, service):
        if isinstance(event, str):
            yield chunk(i, shape.delta(event))
        elif event.reason is Finish.ERROR:
            yield _stream_error(event, service)
            return
        else:
            finished[i] = event
            extra = _choice_extra(sub, i, event, settings)
            yield chunk(i, shape.delta(""), event.reason.openai, uplimit=extra)
    if (body.stream_options or {}).get("include_usage"):
        done = [finished[i] for i in range(len(sub.choices))]
        usage = {**chunk(0, {}), "choices": [], "usage": _usage(sub, done)}
        yield {**usage, "uplimit": _extra(sub, done, settings)}
