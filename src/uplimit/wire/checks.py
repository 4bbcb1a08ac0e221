"""The outer side -> spot-check verifier connection, sans-IO: the CHECK message and its parser.

The outer side hands a random share of finished streams to the verifier (`inner.verifier`),
which re-runs them on its own copy of the strong model. The connection is one-way: the
verifier never writes a byte, since an answer channel from the inner side to the outer would
be an upload with no meter; the outer treats any byte read from it as an alarm.

Byte layout (integers as in `wire.protocol`: `uv` = minimal unsigned LEB128, `u64` 8 bytes
big-endian, `f64` IEEE 754 big-endian)::

    preamble   "UPLV" version:u8 (= 1)
    message    type:u8 length:u32be body[length]           length <= max_message_bytes
    CHECK        1   uv stream_id, u64 seed, uv max_tokens, f64 temperature, f64 top_p,
                     uv top_k, uv n, n x uv token          the stream's spec, as OPEN_STREAM
                                                           sent it down
                     uv best_of                            1..16, as OPEN_STREAM's options said
                     uv m, m x uv token                    1 <= m <= max_tokens: every token
                                                           the outer decoded for the stream

`CheckParser` takes bytes in any chunking and returns complete jobs; anything malformed,
oversized, non-minimal, of unknown type or truncated at `eof()` raises `ProtocolError`, and
the parser stays in ERROR (`wire.protocol`'s `_Parser`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from uplimit.errors import ConfigError, ProtocolError
from uplimit.wire.protocol import (
    MAX_STREAM_TOKENS,
    _Cursor,
    _Parser,
    _read_spec,
    _spec_body,
    _State,
    _uvarint,
)
from uplimit.wire.streams import StreamSpec

__all__ = ["CHECK_PREAMBLE", "CheckJob", "CheckParser", "encode_check"]

CHECK_VERSION = 1
CHECK_PREAMBLE = b"UPLV" + bytes([CHECK_VERSION])
_CHECK = 1
_HEADER = 5  # type:u8 length:u32be

# Limits, each with its reason.
# A job is buffered whole before it is parsed. The largest honest one is a full context:
# prompt + tokens <= MAX_STREAM_TOKENS ids of at most 3 varint bytes (ids < 2**21), 393 kB.
MAX_CHECK_BYTES = 1 << 20
MAX_BEST_OF = 16  # `GenerationRequest`'s limit on candidates per stream


@dataclass(frozen=True)
class CheckJob:
    """One stream to re-run: its spec as sent down, and what the outer decoded for it."""

    spec: StreamSpec
    tokens: tuple[int, ...]  # every decoded token, past a stop sequence too
    best_of: int = 1  # candidates the inner generated; the served one is any of them

    def __post_init__(self) -> None:
        if not 1 <= len(self.tokens) <= self.spec.max_tokens:
            raise ConfigError(f"a check carries 1..max_tokens tokens, got {len(self.tokens)}")
        if not 1 <= self.best_of <= MAX_BEST_OF:
            raise ConfigError(f"best_of must be in 1..{MAX_BEST_OF}, got {self.best_of}")


def encode_check(job: CheckJob) -> bytes:
    """One CHECK message as bytes (the connection starts with `CHECK_PREAMBLE`)."""
    body = b"".join(
        [
            _spec_body(job.spec),
            _uvarint(job.best_of),
            _uvarint(len(job.tokens)),
            *map(_uvarint, job.tokens),
        ]
    )
    if len(body) > MAX_CHECK_BYTES:
        raise ConfigError(f"a CHECK of {len(body):,} bytes is over {MAX_CHECK_BYTES:,}")
    return struct.pack(">BI", _CHECK, len(body)) + body


class CheckParser(_Parser):
    """The verifier's parser of one connection: the preamble, then CHECK messages."""

    def __init__(
        self, *, max_message_bytes: int = MAX_CHECK_BYTES, n_vocab: int | None = None
    ) -> None:
        super().__init__()
        if not 16 <= max_message_bytes <= MAX_CHECK_BYTES:
            raise ConfigError(f"max_message_bytes must be in 16..{MAX_CHECK_BYTES}")
        self.max_message_bytes = max_message_bytes
        self.n_vocab = n_vocab  # token ids must be below it, when known

    def feed(self, data: bytes) -> list[CheckJob]:
        return super().feed(data)

    def _next(self) -> tuple[CheckJob | None, int] | None:
        buf = self._buf
        if self.state is _State.START:
            n = len(CHECK_PREAMBLE)
            if buf[:n] != CHECK_PREAMBLE[: len(buf)]:
                raise ProtocolError(f"verifier preamble {bytes(buf[:n])!r} is not version 1")
            if len(buf) < n:
                return None
            self.state = _State.OPEN
            return None, n
        if buf[0] != _CHECK:  # refused at its first byte, before any length is read
            raise ProtocolError(f"unknown verifier message type {buf[0]}")
        if len(buf) < _HEADER:
            return None
        (length,) = struct.unpack_from(">I", buf, 1)
        if length > self.max_message_bytes:
            raise ProtocolError(
                f"CHECK of {length:,} bytes; the limit is {self.max_message_bytes:,}"
            )
        if len(buf) < _HEADER + length:
            return None
        return self._job(_Cursor(bytes(buf[_HEADER : _HEADER + length]), "CHECK")), (
            _HEADER + length
        )

    def _job(self, c: _Cursor) -> CheckJob:
        spec = _read_spec(c, self.n_vocab)
        best_of = c.uvarint(MAX_BEST_OF, "best_of")
        n = c.uvarint(MAX_STREAM_TOKENS, "token count")
        token_limit = (self.n_vocab or 1 << 32) - 1
        tokens = tuple(c.uvarint(token_limit, "token") for _ in range(n))
        c.done()
        try:
            return CheckJob(spec, tokens, best_of)
        except ConfigError as e:
            raise ProtocolError(f"CHECK: {e}") from e
