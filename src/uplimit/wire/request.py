"""What the outer side asks of the inner side for one stream, and what both derive from it.

The outer sends one `GenerationRequest` down per stream, in the order it adds the stream to
its decoder's table: the coding spec in OPEN_STREAM's fields, the rest as JSON in its `extra`.
Everything in it is the outer's choice (prompt ids, sampling parameters, seed, stop sequences,
candidates), so the inner cannot choose its own randomness (DESIGN.md, invariant 6). Both sides
run the same pure functions here:

- seeds: `choice_seed` gives each of a request's n choices its stream seed (choice 0 keeps the
  request's seed, so a client-supplied seed means what the client expects), and
  `candidate_seed` each best-of-N candidate's (candidate 0 keeps the stream's seed);
- withheld reasoning: `withheld_id` names what a stream's candidate kept inside, so that the
  outer can tell a client the id under which an operator may retrieve it;
- stop sequences: `wire.stops.StopMatcher`; which streams get spot-checked: `wire.checks`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from uplimit.errors import InvalidRequest, ProtocolError
from uplimit.wire.limits import (
    MAX_BEST_OF,
    MAX_EXTRA_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_STOP_BYTES,
    MAX_STOPS,
)
from uplimit.wire.streams import StreamSpec

__all__ = [
    "MAX_BEST_OF",
    "MAX_STOPS",
    "MAX_STOP_BYTES",
    "GenerationRequest",
    "candidate_seed",
    "choice_seed",
    "derive_seed",
    "withheld_id",
]


def derive_seed(seed: int, *labels: object) -> int:
    """A 64-bit seed for (seed, labels): sha256, so unrelated labels give unrelated noise."""
    text = "/".join(map(str, (seed, *labels)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def choice_seed(request_seed: int, index: int) -> int:
    return request_seed if index == 0 else derive_seed(request_seed, "choice", index)


def candidate_seed(stream_seed: int, index: int) -> int:
    return stream_seed if index == 0 else derive_seed(stream_seed, "candidate", index)


@dataclass(frozen=True)
class GenerationRequest:
    """One stream: the coding spec both tables hold, plus what only the services need.

    `withheld_id` set means "upload the reasoning withheld under this id" instead of
    generating: an operator's retrieval, charged like any other upload.
    """

    spec: StreamSpec
    request_id: str
    stop: tuple[str, ...] = ()
    best_of: int = 1
    withheld_id: str | None = None

    def __post_init__(self) -> None:
        # The limits of `wire.limits` (the spec checks its own): what the inner accepts.
        if len(self.stop) > MAX_STOPS:
            raise InvalidRequest(
                f"at most {MAX_STOPS} stop sequences, got {len(self.stop)}", param="stop"
            )
        for s in self.stop:
            if not 1 <= len(_utf8(s, "stop")) <= MAX_STOP_BYTES:
                raise InvalidRequest(
                    f"a stop sequence must have 1..{MAX_STOP_BYTES} bytes", param="stop"
                )
        if not 1 <= self.best_of <= MAX_BEST_OF:
            raise InvalidRequest(
                f"best_of must be in 1..{MAX_BEST_OF}, got {self.best_of}", param="best_of"
            )
        for name, value in (("request_id", self.request_id), ("id", self.withheld_id or "x")):
            if not (value.isprintable() and 1 <= len(_utf8(value, name)) <= MAX_REQUEST_ID_BYTES):
                raise InvalidRequest(
                    f"{name} must be 1..{MAX_REQUEST_ID_BYTES} printable bytes", param=name
                )
        if len(self.extra()) > MAX_EXTRA_BYTES:
            raise InvalidRequest(f"the request's options are over {MAX_EXTRA_BYTES} bytes")

    def extra(self) -> bytes:
        """Everything but the spec, for OPEN_STREAM's `extra` field (compact JSON)."""
        fields = {"request_id": self.request_id, "stop": list(self.stop), "best_of": self.best_of}
        if self.withheld_id is not None:
            fields["withheld_id"] = self.withheld_id
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_extra(cls, spec: StreamSpec, extra: bytes) -> GenerationRequest:
        try:
            d = json.loads(extra)
            withheld = d.get("withheld_id")
            return cls(
                spec,
                str(d["request_id"]),
                tuple(str(s) for s in d["stop"]),
                int(d["best_of"]),
                None if withheld is None else str(withheld),
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidRequest) as e:
            raise ProtocolError(f"invalid stream options: {e!r}") from e


def _utf8(text: str, param: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as e:  # a lone surrogate, from a JSON escape
        raise InvalidRequest(f"{param} is not valid Unicode", param=param) from e


def withheld_id(request_id: str, stream_id: int) -> str:
    """The id under which a stream's withheld reasoning is kept (the outer knows it too)."""
    return f"{request_id}/{stream_id}"
