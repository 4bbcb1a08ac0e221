"""The link's two byte streams, sans-IO: message types, encoders, strict incremental parsers.

Two TCP connections join the inner and the outer side. Each carries one direction only:

    downlink  outer -> inner   not budgeted, but size- and rate-limited, and logged inside
    uplink    inner -> outer   every byte charged to the ledger before it is written

The inner never writes to the downlink connection; the outer treats any byte from it as an
upload that bypassed the meter.

Downlink byte layout (integers: `uv` = unsigned LEB128 varint, minimal encoding only;
`u64` = 8 bytes big-endian; `f64` = IEEE 754 double, big-endian)::

    preamble   "UPLD" version:u8 (= 2; 2: OPEN_STREAM carries tie_nats and tilt)
    message    type:u8 length:u32be body[length]         length <= max_message_bytes
    HELLO        1   uv n, then n x (uv len, key, uv len, value)   keys sorted, unique;
                     the outer's codec fingerprint; first message, exactly once
    OPEN_STREAM  2   uv stream_id, u64 seed, uv max_tokens, f64 temperature, f64 top_p,
                     uv top_k, f64 tie_nats, f64 tilt, uv n, n x uv token, uv m, extra[m]
                     (tie_nats, tilt: compression-aware decoding, `coding.sampling`; 0 = off,
                     never -0.0, and only one of them non-zero, as the temperature allows)
                     (extra: what the inner's services need besides the coding spec, e.g.
                     a request id, stop sequences, best-of; opaque to the link);
                     stream ids increase from one OPEN_STREAM to the next (`wire.streams`)
    CANCEL       3   uv stream_id
    RESEND       4   uv frame_no      (the decoder's `awaiting_resend`)
    SHUTDOWN     5   (empty)          last message: the outer wants the inner to stop
    MODEL_OFFER  6   sha256[32], uv size, uv m, calibration[m]
                     a new weak model is coming down (a rollout, `link.rollout`): the file's
                     hash and size, and its calibration (JSON)
    MODEL_DATA   7   data[length]     the next 1.. bytes of the offered file, in order
    SWITCH       8   sha256[32]       of the new codec fingerprint (its HELLO message): streams
                     opened after this message are coded with the offered model

Uplink byte layout, as small as it can be, since every byte is budgeted::

    verdict    0x21 digest[4]                       accept, protocol 2: the first 4 bytes of
                                                    the sha256 of the inner's fingerprint
             | 0x22 n:u8 n x (index:u8 len:u8 value[len])
                                                    refuse, protocol 2: the fields that differ,
                                                    by index into the outer's sorted HELLO keys,
                                                    with the inner's value (index = number of
                                                    keys: names of fields only the inner has)
    ledger     0x23 ledger_id[16] uv charged flags:u8    right after an accept, exactly once:
                                                    the inner's ledger id and lifetime total
                                                    (charged before this message); flags bit 0:
                                                    the inner claims to run confined (others 0)
    message    frame                                one coded frame, self-delimiting
                                                    (`wire.frame`: no length prefix; at most
                                                    max_frame_bytes)
             | RESYNC END                           END: the marker, then END coded like a
                                                    frame's kind and a reason
                                                    (`wire.frame.encode_end`, 3 bytes): nothing
                                                    follows, ever
             | RESYNC frame...                      after a RESEND: the 8-byte marker below,
                                                    then the raw resends

The verdict's first byte is the uplink's version byte: high nibble the protocol version,
low nibble the verdict. Frame numbers are implicit: both sides count frames, and the frame's
own check covers its number (`wire.frame`), so a replayed or reordered frame fails to decode.
The uplink's messages form a prefix-free code (a verdict, then self-delimiting frames or an
END), which the timing charge relies on (`link.budget`). An idle tick sends nothing.

After the handshake this parser only hands the bytes on (`FrameBytes`): where a frame ends
is known only by decoding it, which `wire.receiver` does with the frame decoder. A frame that
fails its check has no known end, so after a RESEND the receiver skips bytes up to `RESYNC`,
8 bytes the inner writes before its raw resends: a desync costs those 8 bytes, the raw
frames, and the skipped bytes (frames in flight, charged and dropped). END carries the marker
too, so that an END sent while the receiver skips is found, not skipped. Honest frames
contain the marker by chance with probability about 2**-64 per byte position.

Parsers take bytes in any chunking (`feed`) and return complete messages; anything malformed,
oversized, non-minimal, of unknown type, out of order or after the last message raises
`ProtocolError`, and the parser stays in its ERROR state: every later `feed` raises too.
`eof()` raises if the stream ended inside a message.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from uplimit.coding.sampling import SamplingParams
from uplimit.errors import ConfigError, InternalError, InvalidRequest, ProtocolError
from uplimit.wire.frame import encode_end
from uplimit.wire.limits import (
    MAX_EXTRA_BYTES,
    MAX_PROMPT_TOKENS,
    MAX_STREAM_ID,
    MAX_STREAM_TOKENS,
    MAX_TOP_K,
)
from uplimit.wire.parsing import Cursor, Parser, ParserState, read_uvarint, uvarint
from uplimit.wire.streams import StreamSpec

__all__ = [
    "DOWNLINK_PREAMBLE",
    "LEDGER_ID_BYTES",
    "MAX_CHARGED_BYTES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "RESYNC",
    "Accept",
    "ByteRate",
    "Cancel",
    "DownlinkLimits",
    "DownlinkMessage",
    "DownlinkParser",
    "End",
    "EndReason",
    "Frame",
    "FrameBytes",
    "Hello",
    "LedgerReport",
    "ModelData",
    "ModelOffer",
    "OpenStream",
    "ProtocolError",
    "Refuse",
    "Resend",
    "Resync",
    "Shutdown",
    "Switch",
    "UplinkMessage",
    "UplinkParser",
    "accepted_downlink",
    "encode_downlink",
    "encode_spec",
    "encode_uplink",
    "read_spec",
]

PROTOCOL_VERSION = 2  # 2: OPEN_STREAM's tie_nats and tilt
DOWNLINK_PREAMBLE = b"UPLD" + bytes([PROTOCOL_VERSION])
_ACCEPT = PROTOCOL_VERSION << 4 | 1
_REFUSE = PROTOCOL_VERSION << 4 | 2
_LEDGER = PROTOCOL_VERSION << 4 | 3
LEDGER_ID_BYTES = 16
MAX_CHARGED_BYTES = (1 << 63) - 1  # a BIGINT total
RESYNC = bytes.fromhex("a7c3e15f2b9d0486")  # before raw resends (module doc)
DIGEST_BYTES = 4  # an accidental match of two different fingerprints: 2**-32

# Limits, each with its reason.
# A frame is buffered whole before it is decoded. The largest honest frame is a raw resend:
# 1,024 active streams x 255 tokens x 18 bits is 588 kB.
MAX_FRAME_BYTES = 1 << 20
# Refusal fields are indexed by one byte; the fingerprint has about a dozen.
MAX_FIELDS = 64
MAX_KEY_BYTES = 64
MAX_VALUE_BYTES = 4096  # a llama.cpp build string with its CPU features is a few hundred
MAX_REFUSE_VALUE_BYTES = 255  # one length byte; longer values are shortened (fingerprint)
# A stream request's limits (prompt, max_tokens, top_k, extra, ...) are `wire.limits`'s,
# the table the gateway checks requests against.
MAX_FRAME_NO = (1 << 32) - 1  # raw resends carry the frame number in 32 bits (wire.frame)
# A weak model file: Qwen2.5-Coder 0.5B is 0.5 GB in Q4_K_M, 1 GB in F16; room for 64 GiB.
MAX_MODEL_BYTES = 1 << 36
MAX_CALIBRATION_BYTES = 1 << 16  # a calibration is a few hundred bytes of JSON
SHA256_BYTES = 32


class EndReason(IntEnum):
    """Why the inner stops sending (the END message's reason byte)."""

    LIFETIME = 1  # the lifetime budget cannot pay for another frame
    PER_DAY = 2  # today's budget cannot
    PER_SECOND = 3  # a frame is larger than one second's budget, or waited 5 s for one
    SHUTDOWN = 4  # the outer asked (SHUTDOWN) or the inner is being stopped
    ERROR = 5  # the inner failed

    @property
    def exhausted(self) -> bool:
        return self in (EndReason.LIFETIME, EndReason.PER_DAY, EndReason.PER_SECOND)


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The outer's codec fingerprint, sorted by key."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, fingerprint: dict[str, str]) -> Hello:
        return cls(tuple(sorted(fingerprint.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


@dataclass(frozen=True)
class OpenStream:
    spec: StreamSpec
    extra: bytes = b""  # service fields, opaque to the link (protocol doc)


@dataclass(frozen=True)
class Cancel:
    stream_id: int


@dataclass(frozen=True)
class Resend:
    frame_no: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class ModelOffer:
    sha256: bytes  # of the model file
    size: int  # its bytes, 1..MAX_MODEL_BYTES
    calibration: bytes  # the new pair's calibration, JSON


@dataclass(frozen=True)
class ModelData:
    data: bytes


@dataclass(frozen=True)
class Switch:
    fingerprint_sha256: bytes  # of the codec fingerprint both sides will have after it


DownlinkMessage: TypeAlias = (
    Hello | OpenStream | Cancel | Resend | Shutdown | ModelOffer | ModelData | Switch
)


@dataclass(frozen=True)
class Accept:
    digest: bytes  # DIGEST_BYTES of the inner's fingerprint digest


@dataclass(frozen=True)
class Refuse:
    """(index into the outer's sorted keys, the inner's value), by increasing index."""

    fields: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class LedgerReport:
    """The inner's ledger at the handshake: the outer refuses a link whose ledger has charged
    less than the outer has received (a reset or swapped ledger, `link.outer_link`)."""

    ledger_id: bytes  # LEDGER_ID_BYTES
    charged_bytes: int  # the ledger's lifetime total before this message was charged
    confined: bool  # the inner's claim: it runs in its namespace behind the kernel quota


@dataclass(frozen=True)
class Frame:
    data: bytes


@dataclass(frozen=True)
class End:
    reason: EndReason


@dataclass(frozen=True)
class Resync:
    """The marker the receiver skips to after a rejected frame (module doc)."""


@dataclass(frozen=True)
class FrameBytes:
    """Uplink bytes after the handshake, for the frame decoder to delimit (module doc)."""

    data: bytes


UplinkMessage: TypeAlias = Accept | LedgerReport | Refuse | Frame | End | Resync | FrameBytes


class _Type(IntEnum):
    HELLO = 1
    OPEN_STREAM = 2
    CANCEL = 3
    RESEND = 4
    SHUTDOWN = 5
    MODEL_OFFER = 6
    MODEL_DATA = 7
    SWITCH = 8


# --- encoding ---------------------------------------------------------------------------------


def _text(s: str, limit: int, what: str) -> bytes:
    data = s.encode()
    if len(data) > limit:
        raise ConfigError(f"{what} is {len(data)} bytes, at most {limit}")
    if not s.isprintable():  # values end up in logs and alarms
        raise ConfigError(f"{what} {s!r} has control characters")
    return data


def _check_key(key: str) -> None:
    if not (key and all(c.isascii() and (c.isalnum() or c in "._-") for c in key)):
        raise ConfigError(f"fingerprint key {key!r} must be 1.. of [A-Za-z0-9._-]")


def encode_spec(spec: StreamSpec) -> bytes:
    """A stream spec's fields, as OPEN_STREAM (and the verifier's CHECK, `wire.checks`) lay
    them out."""
    p = spec.params
    return b"".join(
        [
            uvarint(spec.stream_id),
            struct.pack(">Q", spec.seed),
            uvarint(spec.max_tokens),
            struct.pack(">dd", p.temperature, p.top_p),
            uvarint(p.top_k),
            struct.pack(">dd", p.tie_nats, p.tilt),
            uvarint(len(spec.prompt)),
            *map(uvarint, spec.prompt),
        ]
    )


def _body(msg: DownlinkMessage) -> tuple[_Type, bytes]:
    match msg:
        case Hello(fields):
            keys = [k for k, _ in fields]
            if keys != sorted(set(keys)) or len(keys) > MAX_FIELDS:
                raise ConfigError(f"HELLO needs at most {MAX_FIELDS} sorted, unique keys")
            parts = [uvarint(len(fields))]
            for key, value in fields:
                _check_key(key)
                k, v = _text(key, MAX_KEY_BYTES, "key"), _text(value, MAX_VALUE_BYTES, "value")
                parts += [uvarint(len(k)), k, uvarint(len(v)), v]
            return _Type.HELLO, b"".join(parts)
        case OpenStream(spec, extra):
            if len(extra) > MAX_EXTRA_BYTES:
                raise ConfigError(f"OPEN_STREAM extra is over {MAX_EXTRA_BYTES:,} bytes")
            return _Type.OPEN_STREAM, encode_spec(spec) + uvarint(len(extra)) + extra
        case Cancel(stream_id):
            return _Type.CANCEL, uvarint(stream_id)
        case Resend(frame_no):
            return _Type.RESEND, uvarint(frame_no)
        case Shutdown():
            return _Type.SHUTDOWN, b""
        case ModelOffer(sha256, size, calibration):
            if len(sha256) != SHA256_BYTES or not 1 <= size <= MAX_MODEL_BYTES:
                raise ConfigError(f"a model offer needs a sha256 and 1..{MAX_MODEL_BYTES} bytes")
            if len(calibration) > MAX_CALIBRATION_BYTES:
                raise ConfigError(f"a calibration is at most {MAX_CALIBRATION_BYTES} bytes")
            body = [sha256, uvarint(size), uvarint(len(calibration)), calibration]
            return _Type.MODEL_OFFER, b"".join(body)
        case ModelData(data):
            if not data:
                raise ConfigError("MODEL_DATA carries at least one byte")
            return _Type.MODEL_DATA, data
        case Switch(digest):
            if len(digest) != SHA256_BYTES:
                raise ConfigError("SWITCH carries a sha256")
            return _Type.SWITCH, digest
    raise ConfigError(f"not a downlink message: {msg!r}")


def encode_downlink(msg: DownlinkMessage) -> bytes:
    """One downlink message as bytes (the connection starts with `DOWNLINK_PREAMBLE`)."""
    kind, body = _body(msg)
    return struct.pack(">BI", kind, len(body)) + body


def encode_uplink(msg: UplinkMessage) -> bytes:
    """One uplink message as bytes: what `MeteredWriter.send` is given, one per tick."""
    match msg:
        case Accept(digest):
            if len(digest) != DIGEST_BYTES:
                raise ConfigError(f"an accept carries {DIGEST_BYTES} digest bytes")
            return bytes([_ACCEPT]) + digest
        case Refuse(fields):
            indices = [i for i, _ in fields]
            if not fields or indices != sorted(set(indices)) or indices[-1] > MAX_FIELDS:
                raise ConfigError("a refusal names 1.. fields by increasing index")
            out = bytearray([_REFUSE, len(fields)])
            for index, value in fields:
                v = _text(value, MAX_REFUSE_VALUE_BYTES, "refused value")
                out += bytes([index, len(v)]) + v
            return bytes(out)
        case LedgerReport(ledger_id, charged, confined):
            if len(ledger_id) != LEDGER_ID_BYTES or not 0 <= charged <= MAX_CHARGED_BYTES:
                raise ConfigError(f"a ledger report carries {LEDGER_ID_BYTES} id bytes and a total")
            return bytes([_LEDGER]) + ledger_id + uvarint(charged) + bytes([int(confined)])
        case Frame(data):
            if not 1 <= len(data) <= MAX_FRAME_BYTES:
                raise ConfigError(f"a frame is 1..{MAX_FRAME_BYTES} bytes, got {len(data)}")
            return bytes(data)  # it delimits itself
        case End(reason):
            return RESYNC + encode_end(EndReason(reason))
        case Resync():
            return RESYNC
    raise ConfigError(f"not an uplink message: {msg!r}")


# --- parsing ----------------------------------------------------------------------------------


def read_spec(c: Cursor, n_vocab: int | None) -> StreamSpec:
    """The fields `encode_spec` wrote; token ids must be below `n_vocab` when it is known."""
    stream_id = c.uvarint(MAX_STREAM_ID, "stream id")
    (seed,) = struct.unpack(">Q", c.take(8))
    max_tokens = c.uvarint(MAX_STREAM_TOKENS, "max_tokens")
    temperature, top_p = struct.unpack(">dd", c.take(16))
    top_k = c.uvarint(MAX_TOP_K, "top_k")
    tie_nats, tilt = struct.unpack(">dd", c.take(16))
    n = c.uvarint(MAX_PROMPT_TOKENS, "prompt length")
    token_limit = (n_vocab or 1 << 32) - 1
    prompt = tuple(c.uvarint(token_limit, "prompt token") for _ in range(n))
    if not all(map(math.isfinite, (temperature, top_p, tie_nats, tilt))):
        raise ProtocolError(f"{c.what}: sampling parameters must be finite")
    if math.copysign(1.0, tie_nats) < 0 or math.copysign(1.0, tilt) < 0:
        raise ProtocolError(f"{c.what}: tie_nats and tilt are never negative, -0.0 included")
    try:
        params = SamplingParams(temperature, top_p, top_k, tie_nats, tilt)
        return StreamSpec(stream_id, prompt, params, seed, max_tokens)
    except InvalidRequest as e:
        raise ProtocolError(f"{c.what}: {e}") from e


@dataclass(frozen=True)
class DownlinkLimits:
    """What the inner accepts from the outer (the downlink is not budgeted, but bounded)."""

    # One message is buffered whole: the longest prompt (MAX_PROMPT_TOKENS x 3 varint bytes,
    # ids < 2**21) is 393 kB, a HELLO at most MAX_FIELDS x ~4 kB.
    max_message_bytes: int = 1 << 20
    # Every ~2 downlink segments make the inner send a 52-byte ACK, which counts against the
    # kernel quota: bounding the downlink's rate bounds that cost (and the log's growth).
    bytes_per_s: float = float(1 << 20)
    burst_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not 16 <= self.max_message_bytes <= 1 << 24:
            raise ConfigError("max_message_bytes must be in 16..2**24")
        if not (self.bytes_per_s > 0 and self.burst_bytes >= self.max_message_bytes):
            raise ConfigError("the downlink rate must be > 0, its burst >= one message")


class DownlinkParser(Parser):
    """The inner side's parser of the downlink: preamble, HELLO, then the other messages."""

    def __init__(self, limits: DownlinkLimits | None = None, *, n_vocab: int | None = None):
        super().__init__()
        self.limits = limits or DownlinkLimits()
        self.n_vocab = n_vocab  # prompt token ids must be below it, when known
        # A model transfer in order: OFFER, its DATA to the byte, then SWITCH, one at a time.
        self.model_bytes_left: int | None = None  # None: no transfer under way

    def feed(self, data: bytes) -> list[DownlinkMessage]:
        return super().feed(data)

    def parse_next(self, buf: bytearray) -> tuple[DownlinkMessage | None, int] | None:
        if self.state is ParserState.START:
            n = len(DOWNLINK_PREAMBLE)
            if buf[:n] != DOWNLINK_PREAMBLE[: len(buf)]:
                raise ProtocolError(
                    f"downlink preamble {bytes(buf[:n])!r} is not protocol {PROTOCOL_VERSION}"
                )
            if len(buf) < n:
                return None
            self.state = ParserState.FIRST
            return None, n
        if len(buf) < 5:
            return None
        code, length = struct.unpack_from(">BI", buf)
        try:
            kind = _Type(code)
        except ValueError:
            raise ProtocolError(f"unknown downlink message type {code}") from None
        if length > self.limits.max_message_bytes:
            raise ProtocolError(
                f"downlink message of {length:,} bytes; the limit is"
                f" {self.limits.max_message_bytes:,}"
            )
        if len(buf) < 5 + length:
            return None
        if (kind is _Type.HELLO) != (self.state is ParserState.FIRST):
            raise ProtocolError("HELLO must be the first downlink message, and only once")
        msg = self._message(kind, Cursor(bytes(buf[5 : 5 + length]), kind.name))
        self._track_transfer(msg)
        self.state = ParserState.DONE if kind is _Type.SHUTDOWN else ParserState.OPEN
        return msg, 5 + length

    def _track_transfer(self, msg: DownlinkMessage) -> None:
        left = self.model_bytes_left
        match msg:
            case ModelOffer(_, size, _):
                if left is not None:
                    raise ProtocolError("MODEL_OFFER while another model transfer is under way")
                self.model_bytes_left = size
            case ModelData(data):
                if left is None or len(data) > left:
                    raise ProtocolError("MODEL_DATA beyond the offered model's size")
                self.model_bytes_left = left - len(data)
            case Switch():
                if left != 0:
                    raise ProtocolError("SWITCH before the offered model has fully arrived")
                self.model_bytes_left = None

    def _message(self, kind: _Type, c: Cursor) -> DownlinkMessage:
        msg: DownlinkMessage
        if kind is _Type.HELLO:
            n = c.uvarint(MAX_FIELDS, "field count")
            fields = tuple(
                (c.text(MAX_KEY_BYTES, "key"), c.text(MAX_VALUE_BYTES, "value")) for _ in range(n)
            )
            keys = [k for k, _ in fields]
            if keys != sorted(set(keys)):
                raise ProtocolError("HELLO keys are not sorted and unique")
            try:
                for key in keys:
                    _check_key(key)
            except ConfigError as e:
                raise ProtocolError(f"HELLO: {e}") from e
            msg = Hello(fields)
        elif kind is _Type.OPEN_STREAM:
            spec = read_spec(c, self.n_vocab)
            msg = OpenStream(spec, c.take(c.uvarint(MAX_EXTRA_BYTES, "extra length")))
        elif kind is _Type.CANCEL:
            msg = Cancel(c.uvarint(MAX_STREAM_ID, "stream id"))
        elif kind is _Type.RESEND:
            msg = Resend(c.uvarint(MAX_FRAME_NO, "frame number"))
        elif kind is _Type.MODEL_OFFER:
            sha256 = c.take(SHA256_BYTES)
            size = c.uvarint(MAX_MODEL_BYTES, "model size")
            if size == 0:
                raise ProtocolError("MODEL_OFFER: an empty model")
            msg = ModelOffer(sha256, size, c.take(c.uvarint(MAX_CALIBRATION_BYTES, "length")))
        elif kind is _Type.MODEL_DATA:
            if not c.data:
                raise ProtocolError("MODEL_DATA is empty")
            msg = ModelData(c.take(len(c.data)))
        elif kind is _Type.SWITCH:
            msg = Switch(c.take(SHA256_BYTES))
        else:
            msg = Shutdown()
        c.done()
        return msg


def accepted_downlink(msg: DownlinkMessage, limits: DownlinkLimits, n_vocab: int | None) -> bytes:
    """`msg` encoded, once the inner's own parser (these limits, past HELLO) has read it back
    as the same message. A message the parser would refuse raises ProtocolError with its
    reason, and the encoder's own refusal is a ConfigError: the outer runs what a client's
    request put in a message through this before sending it, so no request reaches the inner
    that would make it end the link. An encoder and parser that disagree are a bug
    (InternalError)."""
    data = encode_downlink(msg)
    probe = DownlinkParser(limits, n_vocab=n_vocab)
    probe.state = ParserState.OPEN
    if probe.feed(data) != [msg]:
        raise InternalError(f"the downlink parser reads {type(msg).__name__} back differently")
    return data


class UplinkParser(Parser):
    """The outer side's parser of the uplink: a verdict (an accept is followed by the ledger
    report), then the frame stream's bytes as they come (`FrameBytes`, module doc).

    `field_count` is the number of keys the outer sent in HELLO (a refusal indexes them).
    """

    def __init__(self, field_count: int) -> None:
        super().__init__()
        if not 0 <= field_count <= MAX_FIELDS:
            raise ConfigError(f"field_count must be in 0..{MAX_FIELDS}")
        self.field_count = field_count
        self._ledger_due = False  # an accept was read; the ledger report comes next

    def feed(self, data: bytes) -> list[UplinkMessage]:
        return super().feed(data)

    def parse_next(self, buf: bytearray) -> tuple[UplinkMessage, int] | None:
        if self._ledger_due:
            return self._ledger_report(buf)
        if self.state is ParserState.START:
            if buf[0] == _ACCEPT:
                if len(buf) < 1 + DIGEST_BYTES:
                    return None
                self.state = ParserState.OPEN
                self._ledger_due = True
                return Accept(bytes(buf[1 : 1 + DIGEST_BYTES])), 1 + DIGEST_BYTES
            if buf[0] == _REFUSE:
                return self._refusal(buf)
            raise ProtocolError(
                f"uplink verdict byte {buf[0]:#04x} is not protocol {PROTOCOL_VERSION}"
            )
        return FrameBytes(bytes(buf)), len(buf)

    def _ledger_report(self, buf: bytearray) -> tuple[LedgerReport, int] | None:
        if buf[0] != _LEDGER:
            raise ProtocolError(f"expected the ledger report after the accept, got {buf[0]:#04x}")
        pos = 1 + LEDGER_ID_BYTES
        if len(buf) < pos:
            return None
        got = read_uvarint(buf, pos, MAX_CHARGED_BYTES, "ledger total")
        if got is None:
            return None
        charged, pos = got
        if len(buf) < pos + 1:
            return None
        if buf[pos] > 1:
            raise ProtocolError(f"ledger report flags {buf[pos]:#04x}: only bit 0 is defined")
        self._ledger_due = False
        report = LedgerReport(bytes(buf[1 : 1 + LEDGER_ID_BYTES]), charged, bool(buf[pos]))
        return report, pos + 1

    def _refusal(self, buf: bytearray) -> tuple[Refuse, int] | None:
        pos = 1
        if len(buf) < 2:
            return None
        n = buf[pos]
        pos += 1
        if not 1 <= n <= self.field_count + 1:
            raise ProtocolError(f"a refusal names {n} fields; the outer sent {self.field_count}")
        fields = []
        for _ in range(n):
            if len(buf) < pos + 2:
                return None
            index, length = buf[pos], buf[pos + 1]
            if index > self.field_count or (fields and index <= fields[-1][0]):
                raise ProtocolError(f"refused field index {index} is out of order or range")
            if len(buf) < pos + 2 + length:
                return None
            try:
                value = bytes(buf[pos + 2 : pos + 2 + length]).decode()
            except UnicodeDecodeError as e:
                raise ProtocolError("a refused value is not UTF-8") from e
            if not value.isprintable():
                raise ProtocolError("a refused value has control characters")
            fields.append((index, value))
            pos += 2 + length
        self.state = ParserState.DONE
        return Refuse(tuple(fields)), pos


class ByteRate:
    """Token bucket over the downlink's bytes (sans-IO: the caller passes the time)."""

    def __init__(self, bytes_per_s: float, burst_bytes: int, now: float) -> None:
        self.rate, self.burst = bytes_per_s, burst_bytes
        self._level, self._at = float(burst_bytes), now

    def take(self, n: int, now: float) -> bool:
        """Spend `n` bytes at `now`; False (nothing spent) if that exceeds the rate."""
        self._level = min(self.burst, self._level + max(0.0, now - self._at) * self.rate)
        self._at = max(self._at, now)
        if n > self._level:
            return False
        self._level -= n
        return True
