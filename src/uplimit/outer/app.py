"""The OpenAI-compatible HTTP layer: translate requests to `OuterService` calls and back.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
GET /health, and POST /v1/uplimit/withheld (an operator, with the admin key, asks for
withheld reasoning; it is
uploaded like any answer, so it is charged to the budget).

Supported parameters: model, messages / prompt, temperature, top_p, max_tokens
(max_completion_tokens), stop, seed, n, stream (+ stream_options.include_usage), and four
extensions: top_k, best_of (candidates generated inside per choice; only the best is
uploaded), and compression-aware decoding's tie_nats (T = 0) and tilt (T > 0), which trade
the strong model's exact output for fewer uploaded bits (`coding.sampling`; defaults from
[coding]). Parameters that would change the output but are not implemented (logprobs, tools,
penalties, logit_bias, ...) are refused rather than ignored.

Every 4xx and 5xx has OpenAI's shape, {"error": {"message", "type", "param", "code"}}
(`outer.api_errors`); uplimit's errors are mapped in one place (`_api_error`), and what
reaches no route is refused in front of the app (`outer.gate`). docs/serving.md lists every
status. A request is checked against the protocol's own limits (`wire.limits`) before it is
sent, so a request the inner would refuse is a 400 here, not a link that ends for everyone.
A link that is not serving is a 503 with a fixed text per state: never its reason, which the
inner may have chosen.

Each response carries an `uplimit` object: the request's seed, and per choice the uplink bits
it cost (its share of every frame, and of that its tokens' own code: `payload_bits`), its
tokens, when reasoning is kept inside, its withheld-reasoning id and withheld token count, and
`tie_nats` or `tilt` with its value when one was on (the answer is then not the strong model's
exact output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from uplimit.coding.generate import Finish
from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, InvalidRequest, LinkClosed, UplimitError
from uplimit.outer.api_errors import (
    LINK_TEXT,
    ApiError,
    error_response,
    invalid,
    link_error,
    refusal_error,
)
from uplimit.outer.gate import Gate
from uplimit.outer.keys import KeyRing
from uplimit.outer.rollout import Rollout, RolloutBusy
from uplimit.outer.service import Choice, Finished, OuterService, PromptTooLong, Submission
from uplimit.outer.status import StatusBoard
from uplimit.outer.status_page import add_status_routes
from uplimit.wire.limits import MAX_BEST_OF
from uplimit.wire.receiver import LinkState
from uplimit.wire.request import withheld_id

__all__ = ["ApiSettings", "create_app", "server_config"]

T = TypeVar("T")

CLIENT_GONE = 499  # nginx's "client closed request": logged, never received

log = logging.getLogger(__name__)


# A request body's bytes per token of context: a prompt as a token-id list is up to 8 bytes
# a token ("151935, "), as text a few bytes, up to 12 when every character is a JSON escape.
BODY_BYTES_PER_TOKEN = 16
BODY_BYTES_SLACK = 64 << 10  # the rest of the body: parameters, stop sequences, metadata


@dataclass(frozen=True)
class ApiSettings:
    model_name: str = "uplimit"
    api_key: str | None = None  # clients must send it as a bearer token when set
    max_best_of: int = 8
    reasoning: bool = False  # the inner keeps reasoning inside: responses carry withheld ids
    # bearer token of /admin/* and /v1/uplimit/withheld; None: neither is served (404)
    admin_key: str | None = None
    # A request body's cap; None: sized for the context (BODY_BYTES_PER_TOKEN per token)
    max_body_bytes: int | None = None
    # POST requests in flight (each holds up to n streams); past it a 429 with Retry-After
    max_requests: int = 256
    # Connections open at once, idle keep-alives and GETs included: a backstop above the
    # app's own 429, past which uvicorn answers a plain-text 503. Sized for clients, not for
    # requests: a client population bigger than it loses answers.
    max_connections: int = 1024
    # Compression-aware decoding for requests that do not say ([coding] tie_nats, tilt): each
    # applies where the temperature allows it (tie_nats at T = 0, tilt at T > 0); 0: off.
    tie_nats: float = 0.0
    tilt: float = 0.0

    def __post_init__(self) -> None:
        for name in ("api_key", "admin_key"):
            key = getattr(self, name)
            if key is not None and not (key and all(0x21 <= ord(c) <= 0x7E for c in key)):
                raise ConfigError(f"{name} must be printable ASCII without spaces")
        if not 1 <= self.max_best_of <= MAX_BEST_OF:
            raise ConfigError(f"max_best_of must be in 1..{MAX_BEST_OF}")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.max_requests < 1:
            raise ConfigError("max_requests must be >= 1")
        if self.max_connections <= self.max_requests:
            raise ConfigError("max_connections must be above max_requests")
        try:  # the ranges a request's own values must be in
            SamplingParams(0.0, tie_nats=self.tie_nats)
            SamplingParams(1.0, tilt=self.tilt)
        except InvalidRequest as e:
            raise ConfigError(f"[coding] {e}") from e

    def body_cap(self, max_context: int) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_PER_TOKEN * max_context + BODY_BYTES_SLACK


def server_config(app: FastAPI, settings: ApiSettings, host: str, port: int,
                  **options: Any) -> uvicorn.Config:  # fmt: skip
    """uvicorn's settings for the API: connection limits and timeouts set, not left open."""
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning",
        limit_concurrency=settings.max_connections,  # ApiSettings
        backlog=2048,
        timeout_keep_alive=5,  # an idle keep-alive connection is closed after 5 s
        h11_max_incomplete_event_size=16 << 10,  # request line and headers: 16 KiB
        **options,
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
    # Numbers only (no "1.0", no true): a knob that changes the answer is parsed strictly.
    tie_nats: float | None = Field(default=None, strict=True)
    tilt: float | None = Field(default=None, strict=True)
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


def _check_extras(body: _Body) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
            raise invalid(f"{name} is not supported by this server", name)


def _params(body: _Body, settings: ApiSettings) -> SamplingParams:
    """Raises InvalidRequest (a 400 naming the parameter) when one is out of range, or when
    the request asks for a knob its temperature does not allow; the server's defaults apply
    only where they can."""
    t = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    tie_nats, tilt = body.tie_nats, body.tilt
    if tie_nats is None:
        tie_nats = settings.tie_nats if t == 0.0 else 0.0
    if tilt is None:
        tilt = settings.tilt if t != 0.0 else 0.0
    return SamplingParams(t, top_p, body.top_k or 0, tie_nats, tilt)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple; `GenerationRequest` checks it against the protocol's limits."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


# --- the app ----------------------------------------------------------------------------------


def create_app(
    service: OuterService,
    settings: ApiSettings,
    rollout: Rollout | None = None,
    status: StatusBoard | None = None,
    keyring: KeyRing | None = None,
) -> FastAPI:
    """The OpenAI-compatible API; with `settings.admin_key` and a `rollout`, also
    `POST /admin/rollout` (start one) and `GET /admin/rollout` (its status); with a `status`
    board, `GET /status` and `/status.json` (behind the admin key when one is set); with a
    `keyring`, its keys (and their limits) open /v1/* besides `settings.api_key`."""
    # One thread tokenises: off the event loop that reads the uplink, one text at a time.
    tokenizer = ThreadPoolExecutor(1, thread_name_prefix="uplimit-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        tokenizer.shutdown(wait=False)

    app = FastAPI(title="uplimit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.keyring = keyring
    if status is not None:
        add_status_routes(app, status, settings.admin_key)
    model = service.model

    app.add_middleware(
        Gate, api_key=settings.api_key, admin_key=settings.admin_key,
        max_requests=settings.max_requests,
        max_body_bytes=settings.body_cap(service.max_context), keyring=keyring,
    )  # fmt: skip

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizer, fn, *args)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(UplimitError)
    async def _on_uplimit_error(request: Request, e: UplimitError) -> JSONResponse:
        return error_response(_api_error(e, service))

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(invalid(f"{param or 'body'}: {first.get('msg', 'invalid')}", param))

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, e: HTTPException) -> JSONResponse:
        # Starlette's own: no such route (404), method (405), a body it could not read (400)
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        else:
            message = str(e.detail)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(ApiError(e.status_code, message, kind, None))

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error answering %s: %r", request.url.path, e, exc_info=e)
        return error_response(ApiError(500, "internal error", "server_error", None))

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
        params = _params(body, settings)
        if not 1 <= body.n <= service.max_choices:
            raise invalid(f"n must be in 1..{service.max_choices}", "n")
        best_of = body.best_of or 1
        if not 1 <= best_of <= settings.max_best_of:
            raise invalid(f"best_of must be in 1..{settings.max_best_of}", "best_of")
        return params, _stops(body.stop), best_of

    async def submit(body: _Body, prompt: list[int], max_tokens: int | None, id_: str):
        params, stops, best_of = check_common(body)
        if max_tokens is not None and max_tokens < 1:
            raise invalid("max_tokens must be >= 1", "max_tokens")
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
        state = service.state
        body = {"link": state.value, "message": LINK_TEXT[state]}  # fixed: no inner bytes
        return JSONResponse(body, status_code=200 if state is LinkState.SERVING else 503)

    @app.post("/v1/chat/completions")
    async def chat(body: _ChatBody, request: Request) -> Any:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _content(m)}
            for m in body.messages
        ]
        try:
            prompt = await off_loop(model.chat_tokens, messages)
        except InvalidRequest as e:
            raise invalid(str(e), "messages") from e
        max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = body.max_tokens
        sub = await submit(body, prompt, max_tokens, f"chatcmpl-{uuid.uuid4().hex[:24]}")
        if body.stream:
            return _sse(_chunks(_CHAT, sub, body, settings, service, request))
        return await _response(_CHAT, sub, body, settings, service, request)

    @app.post("/v1/completions")
    async def completions(body: _CompletionBody, request: Request) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise invalid("one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await off_loop(model.tokenize, prompt)
        else:
            ids = list(prompt)
            if not all(0 <= t < model.info.n_vocab for t in ids):
                raise invalid("a prompt token id is outside the vocabulary", "prompt")
        if not ids:
            raise invalid("the prompt is empty", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        sub = await submit(body, ids, max_tokens, f"cmpl-{uuid.uuid4().hex[:24]}")
        if body.stream:
            return _sse(_chunks(_COMPLETION, sub, body, settings, service, request))
        return await _response(_COMPLETION, sub, body, settings, service, request)

    @app.post("/v1/uplimit/withheld")
    async def withheld(body: _WithheldBody) -> dict:
        """An operator asks for reasoning that stayed inside; it is uploaded and charged."""
        if not settings.reasoning:
            raise invalid("this server does not keep reasoning inside", "id")
        sub = await service.retrieve(body.id)
        (choice,) = sub.choices
        text, finished = await _collect(choice)
        return {
            "id": body.id,
            "text": text,
            "tokens": finished.tokens,
            "uplimit": {"uploaded_bits": finished.bits},
        }

    if settings.admin_key is not None and rollout is not None:
        _add_admin_routes(app, rollout)
    return app


def _add_admin_routes(app: FastAPI, rollout: Rollout) -> None:
    @app.post("/admin/rollout", status_code=202)
    async def start_rollout(body: _RolloutBody) -> dict:
        """Send a new weak model down and switch to it (outer/rollout.py)."""
        try:
            return rollout.start(body.weak, body.calibration).as_dict()
        except RolloutBusy as e:
            raise ApiError(409, str(e), "invalid_request_error", "rollout_busy") from e
        except ConfigError as e:
            raise invalid(str(e), "weak") from e

    @app.get("/admin/rollout")
    async def rollout_status() -> dict:
        return rollout.status.as_dict()


def _content(m: _Message) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "uplimit"}


# --- errors -----------------------------------------------------------------------------------


def _api_error(e: UplimitError, service: OuterService) -> ApiError:
    """The one mapping from uplimit's errors to HTTP: the client's input is a 400, the link's
    state a 503 (its fixed text: the reason is in the log), and anything else our fault, a
    500 with its cause in the log only."""
    if isinstance(e, PromptTooLong):
        return invalid(str(e), "messages", "context_length_exceeded")
    if isinstance(e, InvalidRequest):
        return invalid(str(e), e.param)
    if isinstance(e, LinkClosed):
        return link_error(service.state)
    log.error("internal error answering a request: %r", e, exc_info=e)
    return ApiError(500, "internal error", "server_error", None)


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
    params = sub.choices[index].request.spec.params
    if params.tie_nats:  # the answer is not the strong model's exact output: say so
        extra["tie_nats"] = params.tie_nats
    if params.tilt:
        extra["tilt"] = params.tilt
    return extra


def _extra(sub: Submission, finished: Sequence[Finished], settings: ApiSettings) -> dict:
    return {
        "seed": sub.seed,
        "uploaded_bits": round(sum(f.bits for f in finished), 3),
        "choices": [_choice_extra(sub, i, f, settings) for i, f in enumerate(finished)],
    }


def _charge(request: Request, bits: float) -> None:
    """An answer's uploaded bits, to the key that asked (`outer.keys`), if it has one."""
    name = request.scope.get("state", {}).get("api_key")
    if name is not None:
        request.app.state.keyring.charge(name, bits)


class _ClientGone(Exception):
    """The client hung up before its answer was ready; its streams are cancelled."""


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (its body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _gather(
    sub: Submission, service: OuterService, request: Request
) -> list[tuple[str, Finished]]:
    """Every choice's text; a client that hangs up first cancels its streams (_ClientGone)."""
    answers = asyncio.ensure_future(asyncio.gather(*(_collect(c) for c in sub.choices)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled
        gone.cancel()
        if not answers.done():
            answers.cancel()
            for c in sub.choices:
                await service.cancel(c)
    if not answers.done():
        raise _ClientGone
    results = answers.result()
    for _, f in results:
        if f.reason is Finish.ERROR:
            raise link_error(service.state)
        if f.refusal is not None:
            raise refusal_error(f.refusal)
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
    shape: _Shape,
    sub: Submission,
    body: _Body,
    settings: ApiSettings,
    service: OuterService,
    request: Request,
) -> dict | Response:
    try:
        results = await _gather(sub, service, request)
    except _ClientGone:
        return Response(status_code=CLIENT_GONE)  # no one reads it
    finished = [f for _, f in results]
    _charge(request, sum(f.bits for f in finished))
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


def _stream_error(service: OuterService) -> dict:
    return link_error(service.state).body()


async def _chunks(
    shape: _Shape,
    sub: Submission,
    body: _Body,
    settings: ApiSettings,
    service: OuterService,
    request: Request,
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
            yield _stream_error(service)
            return
        elif event.refusal is not None:
            yield refusal_error(event.refusal).body()
            return
        else:
            finished[i] = event
            _charge(request, event.bits)
            extra = _choice_extra(sub, i, event, settings)
            yield chunk(i, shape.delta(""), event.reason.openai, uplimit=extra)
    if (body.stream_options or {}).get("include_usage"):
        done = [finished[i] for i in range(len(sub.choices))]
        usage = {**chunk(0, {}), "choices": [], "usage": _usage(sub, done)}
        yield {**usage, "uplimit": _extra(sub, done, settings)}
