"""What every HTTP request passes before a route sees it (pure ASGI, in front of the app).

In order, each refusal OpenAI-shaped (`outer.api_errors`):

    404  an operator's path (/admin/*, and /v1/uplimit/withheld: withheld reasoning is
         uploaded and charged, so retrieving it is an operator's action) on a server without
         an admin key
    401  a missing, malformed or non-ASCII `Authorization`, or a wrong key (compared in
         constant time, as bytes: a header is never decoded before it is checked); on /v1/*
         the key is the `api_key` or one of the keys file's (`outer.keys`)
    429  more requests in flight than `max_requests` (POST only: /health and the model list
         always answer); `Retry-After` says when to try again
    413  a body over `max_body_bytes` (by Content-Length, or counted as it arrives)
    400  a body that is not strict JSON: not UTF-8, NaN/Infinity, nested deeper than
         MAX_JSON_DEPTH, or a string with a lone surrogate (from a `\\ud800` escape), which
         would fail later, deep in tokenisation, as a 500
    429  a request that would take its key past one of its limits (`outer.keys`)

A request admitted with a key of the keys file carries its name in `scope["state"]["api_key"]`,
so that the app can charge the key the answer's uploaded bits.

The app then parses the body again (FastAPI), from the bytes read here.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uplimit.outer.api_errors import ApiError, error_response, invalid
from uplimit.outer.keys import DAY_S, MINUTE_S, ApiKey, KeyRing

__all__ = ["MAX_JSON_DEPTH", "Gate", "bearer_token", "check_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# An OpenAI request nests 5 deep (body, messages, a message, its content parts, a part);
# metadata and the refused tool schemas a few more.
MAX_JSON_DEPTH = 32
OPERATOR_PATHS = ("/admin/", "/v1/uplimit/withheld")  # behind the admin key
RETRY_AFTER_S = 1  # a request in flight takes about this long to start streaming


class _ClientGone(Exception):
    """The client hung up before its body arrived: there is no one to answer."""


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the one `Authorization: Bearer <token>` header; None when there is none,
    several, or it is malformed (a token is 1.. printable ASCII bytes, RFC 6750's charset
    and more)."""
    values = [v for k, v in scope["headers"] if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(b" ")
    if scheme.lower() != b"bearer" or not token or not all(0x21 <= b <= 0x7E for b in token):
        return None
    return token


def _key_ok(scope: Scope, key: str) -> bool:
    token = bearer_token(scope)
    # compare_digest on bytes: constant time, and no TypeError on non-ASCII
    return token is not None and hmac.compare_digest(token, key.encode())


class Gate:
    """The checks of the module doc, around `app`. `api_key` None: /v1/* is open;
    `admin_key` None: the operator's paths are a 404."""

    def __init__(
        self,
        app: App,
        *,
        api_key: str | None,
        admin_key: str | None,
        max_body_bytes: int,
        max_requests: int,
        keyring: KeyRing | None = None,
    ) -> None:
        self.app = app
        self.api_key, self.admin_key, self.keyring = api_key, admin_key, keyring
        self.max_body_bytes, self.max_requests = max_body_bytes, max_requests
        self.in_flight = 0  # POST requests being answered (streams included)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted, held, key = False, 0, None
        try:
            key = self._authorize(scope)
            if scope["method"] == "POST":
                if self.in_flight >= self.max_requests:
                    raise _too_many("too many requests in flight", RETRY_AFTER_S)
                self.in_flight += 1
                counted = True
            body = await self._body(scope, receive)
            value = check_json(body) if body else None
            if key is not None and scope["method"] == "POST":
                self._admit(key, _streams(value))
                held = _streams(value)
                scope.setdefault("state", {})["api_key"] = key.name
            await self.app(scope, _replay(body, receive), send)
        except ApiError as e:
            await error_response(e)(scope, receive, send)
        except _ClientGone:
            pass
        finally:
            self.in_flight -= counted
            if held and self.keyring is not None and key is not None:
                self.keyring.release(key, held)

    def _admit(self, key: ApiKey, streams: int) -> None:
        assert self.keyring is not None
        over = self.keyring.admit(key, streams)
        if over == "per_minute":
            raise _too_many(f"key {key.name!r} is over its requests per minute", MINUTE_S)
        if over == "streams":
            raise _too_many(f"key {key.name!r} has its streams open", RETRY_AFTER_S)
        if over == "bits_per_day":
            left = DAY_S - int(self.keyring.clock()) % DAY_S
            raise _too_many(f"key {key.name!r} has uploaded its bits for today", left)

    def _authorize(self, scope: Scope) -> ApiKey | None:
        """Raises the 401 or 404; the keys file's key the request carries, if any."""
        path = scope["path"]
        if path.startswith(OPERATOR_PATHS):
            if self.admin_key is None:
                raise ApiError(404, "no admin API here", "invalid_request_error", "not_found")
            if not _key_ok(scope, self.admin_key):
                raise ApiError(401, "invalid admin key", "authentication_error", "invalid_api_key")
            return None
        if not path.startswith("/v1/") or (self.api_key is None and self.keyring is None):
            return None
        if self.api_key is not None and _key_ok(scope, self.api_key):
            return None
        token = bearer_token(scope)
        key = self.keyring.find(token) if self.keyring is not None and token else None
        if key is None:
            raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
        return key

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        too_large = ApiError(
            413, f"the request body is over {self.max_body_bytes:,} bytes",
            "invalid_request_error", "request_too_large",
        )  # fmt: skip
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 19):
            raise invalid("Content-Length is not a number", None, "invalid_request")
        if lengths and int(lengths[0]) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_many(message: str, retry_after_s: float) -> ApiError:
    headers = {"Retry-After": str(max(1, int(retry_after_s)))}
    return ApiError(429, message, "requests", "rate_limit_exceeded", headers=headers)


def _streams(body: object) -> int:
    """The streams a request holds: its `n` (the app checks it; here only a count)."""
    n = body.get("n", 1) if isinstance(body, dict) else 1
    return n if isinstance(n, int) and 1 <= n <= 64 else 1


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with the body already read given back first; then the server's own
    messages (a client's disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def check_json(body: bytes) -> object:
    """`body` parsed; a 400 unless it is strict JSON (module doc)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise invalid("the request body is not UTF-8", None, "invalid_json") from e
    except (ValueError, RecursionError) as e:
        raise invalid("the request body is not valid JSON", None, "invalid_json") from e
    todo: list[tuple[object, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise invalid(f"the JSON nests deeper than {MAX_JSON_DEPTH}", None, "invalid_json")
        if isinstance(item, dict):
            todo += [(k, depth) for k in item]
            todo += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            todo += [(v, depth + 1) for v in item]
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as e:
                raise invalid("a string is not valid Unicode", None, "invalid_json") from e
    return value
