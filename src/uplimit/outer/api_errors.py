"""The API's errors: OpenAI's shape, and one fixed text per link state.

Every 4xx and 5xx the gateway answers has OpenAI's body, {"error": {"message", "type",
"param", "code"}}. When the link is not serving, users read a fixed text chosen by its state
(`LINK_TEXT`), never the link's reason: that can carry bytes the inner chose (a refused
fingerprint's values, say), and the inner must not be able to write to users outside the
metered frames. The reason goes to the log (`outer.service`) and the link's alarms and metrics.
A stream the inner refused is answered the same way: a fixed text per `Refusal`, of which the
inner chose two bits.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from uplimit.wire.frame import Refusal
from uplimit.wire.receiver import LinkState

__all__ = ["LINK_TEXT", "ApiError", "error_response", "invalid", "link_error", "refusal_error"]

# What a user reads about the link, by state (/health, 503s, a stream's error event).
LINK_TEXT: dict[LinkState, str] = {
    LinkState.HANDSHAKING: "the model is starting; try again shortly",
    LinkState.SERVING: "the model is serving",
    LinkState.EXHAUSTED: "upload budget exhausted",
    LinkState.CLOSED: "the model has stopped serving",
    LinkState.FAILED: "the model is unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param,
        )  # fmt: skip
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}
        }  # fmt: skip


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """A 400: the client's input is at fault."""
    return ApiError(400, message, "invalid_request_error", code, param)


def link_error(state: LinkState) -> ApiError:
    """The 503 for a link that is not serving: a fixed text per state (module doc)."""
    if state is LinkState.EXHAUSTED:
        return ApiError(503, LINK_TEXT[state], "server_error", "upload_budget_exhausted")
    if state is LinkState.SERVING:  # it stopped taking streams and will say why next
        state = LinkState.CLOSED
    return ApiError(503, LINK_TEXT[state], "server_error", "inner_unreachable")


# What a user reads about a refused stream: (status, type, code, text) per refusal.
_REFUSALS: dict[Refusal, tuple[int, str, str, str]] = {
    Refusal.INVALID: (
        400, "invalid_request_error", "invalid_request",
        "the model refused this request's options",
    ),
    Refusal.CONTEXT: (
        400, "invalid_request_error", "context_length_exceeded",
        "the prompt leaves no room in the model's context",
    ),
    Refusal.FAILED: (
        500, "server_error", "generation_failed",
        "the model failed on this request; other requests are not affected",
    ),
}  # fmt: skip


def refusal_error(refusal: Refusal) -> ApiError:
    """The error for a stream the inner refused (module doc); the link goes on."""
    status, type_, code, text = _REFUSALS[refusal]
    return ApiError(status, text, type_, code)
