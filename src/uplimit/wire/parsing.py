"""What the link's parsers share, sans-IO: varints, a message-body cursor, the parser base.

Integers are unsigned LEB128 varints, minimal encoding only (one value, one encoding), each
read against a limit that its field states. `Parser` buffers bytes fed in any chunking, hands
complete messages out, latches in ERROR after the first `ProtocolError` and refuses a stream
that ends inside a message; each format (`wire.protocol`'s two directions, `wire.checks`)
implements `parse_next` and its own preamble.
"""

from __future__ import annotations

from enum import StrEnum

from uplimit.errors import ConfigError, ProtocolError

__all__ = ["Cursor", "Parser", "ParserState", "read_uvarint", "uvarint"]


def uvarint(n: int) -> bytes:
    if n < 0:
        raise ConfigError(f"varints are unsigned, got {n}")
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_uvarint(buf: bytes | bytearray, pos: int, limit: int, what: str) -> tuple[int, int] | None:
    """(value, position after it), or None if `buf` ends inside it. Raises if the value
    exceeds `limit` or is not minimally encoded (one value, one encoding)."""
    value = 0
    for i in range(max(1, -(-limit.bit_length() // 7))):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if value > limit:
            raise ProtocolError(f"{what} exceeds {limit}")
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ProtocolError(f"{what} is not minimally encoded")
            return value, pos + i + 1
    raise ProtocolError(f"{what} is longer than any value up to {limit} needs")


class Cursor:
    """Reads one complete message body; running short or leaving bytes over is an error."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"{self.what} is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uvarint(self, limit: int, what: str) -> int:
        got = read_uvarint(self.data, self.pos, limit, f"{self.what}: {what}")
        if got is None:
            raise ProtocolError(f"{self.what} is truncated")
        value, self.pos = got
        return value

    def text(self, limit: int, what: str) -> str:
        raw = self.take(self.uvarint(limit, f"{what} length"))
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{self.what}: {what} is not UTF-8") from e
        if not text.isprintable():
            raise ProtocolError(f"{self.what}: {what} has control characters")
        return text

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.what} has {len(self.data) - self.pos} bytes left over")


class ParserState(StrEnum):
    START = "start"  # before the preamble / verdict
    FIRST = "first"  # downlink: preamble read, HELLO expected
    OPEN = "open"  # messages flow
    DONE = "done"  # after the last message (SHUTDOWN, END, refusal): nothing may follow
    ERROR = "error"


class Parser:
    """Buffering, the ERROR latch and `eof`, shared by both directions."""

    def __init__(self) -> None:
        self.state = ParserState.START
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list:
        if self._error is not None:
            raise ProtocolError(f"parser is in ERROR after: {self._error}") from self._error
        self._buf += data
        out = []
        try:
            while self._buf:
                if self.state is ParserState.DONE:
                    raise ProtocolError(f"{len(self._buf)} bytes after the last message")
                got = self.parse_next(self._buf)
                if got is None:
                    break
                msg, used = got
                del self._buf[:used]
                if msg is not None:  # None: a preamble, consumed without a message
                    out.append(msg)
        except ProtocolError as e:
            self._fail(e)
            raise
        return out

    def eof(self) -> None:
        """The connection ended: fine between messages, an error inside one."""
        if self._error is not None:
            raise ProtocolError(f"parser is in ERROR after: {self._error}") from self._error
        if self._buf:
            error = ProtocolError(f"stream ended inside a message ({len(self._buf)} bytes)")
            self._fail(error)
            raise error

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _fail(self, e: ProtocolError) -> None:
        self._error = e
        self.state = ParserState.ERROR
        self._buf.clear()

    def parse_next(self, buf: bytearray) -> tuple[object | None, int] | None:
        """The next message at the start of `buf` and the bytes it used (None for a message:
        a preamble, consumed), or None until more bytes arrive; raises ProtocolError. Each
        format's parser implements it."""
        raise NotImplementedError
