"""The outer side's uplink, sans-IO: bytes in, events out, and the link's state.

`UplinkReceiver` runs the strict `UplinkParser`, checks the handshake verdict against the
outer's fingerprint, and hands the bytes after it to the frame decoder, which finds where each
frame (or END) ends by decoding it (`wire.frame`: frames delimit themselves). It never raises
on anything the inner sends: every problem becomes an event, and the state says what the link
is now.

    state        meaning                                   what the outer does
    handshaking  waiting for the inner's verdict and its
                 ledger report
    serving      frames flow
    exhausted    the inner said (END) its budget is spent   answer "upload budget exhausted"
    closed       the inner stopped as asked (END shutdown)
    failed       anything else: a protocol violation, a     alarm; close both connections;
                 refusal, decoding that keeps failing,      answer 503
                 an uplink closed without END

Events: `Accepted`, `Delivered` (a decoded frame: the only source of text), `Rejected` (a frame
that failed its check: nothing of it is delivered; `resend_from` is set when the outer must
send RESEND), `Ended`, `Failed` (with an alarm kind). Malformed, truncated, oversized input
fails the link; a replayed, reordered or corrupted frame fails the decoder's check and is
recovered by a raw resend. Every failure is final: the parser and this object stay failed.

Bytes that may be the start of a longer frame wait for more (`incomplete`); the caller calls
`expire()` if none come for `INCOMPLETE_PATIENCE_S`, and what is there is then judged as it
is: a frame whose decoder disagrees with the encoder is detected within that time even when
nothing follows it. A rejected frame's end is unknown, so after one the receiver skips bytes
up to the inner's `RESYNC` marker, which precedes its raw resends and every END
(`wire.protocol`): an END sent while the receiver skips is still found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeAlias

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError, DecodeMismatch
from uplimit.models.base import Session
from uplimit.wire.fingerprint import fingerprint_digest, refused_differences
from uplimit.wire.frame import EndMessage, FrameContent, FrameStats
from uplimit.wire.protocol import (
    MAX_FRAME_BYTES,
    RESYNC,
    Accept,
    EndReason,
    FrameBytes,
    LedgerReport,
    ProtocolError,
    Refuse,
    UplinkParser,
)
from uplimit.wire.streams import StreamSpec

__all__ = [
    "INCOMPLETE_PATIENCE_S",
    "Accepted",
    "AlarmKind",
    "Delivered",
    "Ended",
    "Failed",
    "FrameSink",
    "LedgerCheck",
    "LinkState",
    "ReceiverEvent",
    "Rejected",
    "UplinkReceiver",
]

# Decoding that fails again and again (each time recovered by a raw resend) means the sides
# do not compute the same weak-model numbers: stop rather than resend raw frames forever.
MAX_MISMATCHES_IN_A_ROW = 3
# Frames the inner had sent before it saw a RESEND are skipped as they arrive: a second of
# frames at a 100 ms tick, well over the round trip. More means the inner ignores RESEND.
MAX_REJECTED_WHILE_WAITING = 64
# How long bytes that may begin a longer frame wait for the rest: a frame is written at once,
# so the rest of it is a TCP segment away; a mismatch in the last frame before a silence is
# detected after this long (issue 18's bound: 1 s). A wrong call costs a resend, no text.
INCOMPLETE_PATIENCE_S = 0.5
# The frame decoder reads 64 bits ahead: with this many bytes beyond the longest frame, more
# data cannot change what it decodes.
_LOOKAHEAD_BYTES = 8


class LinkState(StrEnum):
    HANDSHAKING = "handshaking"
    SERVING = "serving"
    EXHAUSTED = "exhausted"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (LinkState.EXHAUSTED, LinkState.CLOSED, LinkState.FAILED)


class AlarmKind(StrEnum):
    PROTOCOL = "protocol"  # malformed, truncated, oversized uplink bytes, or bytes after END
    FINGERPRINT = "fingerprint"  # refused, or accepted with another fingerprint
    MISMATCH = "mismatch"  # a frame failed its check (replayed, reordered, corrupted)
    DECODER = "decoder"  # mismatches keep coming, or the inner ignores RESEND
    CLOSED = "closed"  # the uplink ended without END
    INNER_ERROR = "inner-error"  # the inner ended with END(error)
    DOWNLINK_UPLOAD = "downlink-upload"  # the inner wrote on the downlink: an unmetered upload
    CONNECTION = "connection"  # a connection the link did not expect
    AUTH = "auth"  # a connection failed the challenge (`link.auth`)
    RECEIVE_BUDGET = "receive-budget"  # the outer's own lifetime receive budget is spent
    TIMEOUT = "timeout"  # no verdict in time
    LEDGER = "ledger"  # the inner's ledger charged less than the outer received, or changed
    INTERNAL = "internal"  # a bug on the outer side; fail closed


class FrameSink(Protocol):
    """A frame decoder, as the outer uses it (`wire.frame.FrameDecoder`)."""

    frame_no: int
    awaiting_resend: int | None

    def add_stream(self, spec: StreamSpec) -> None: ...

    def decode_next(
        self, data: bytes, *, final: bool
    ) -> tuple[FrameContent, FrameStats] | EndMessage | None: ...

    def switch(
        self, weak_session: Session, calibration: Calibration, release: Callable[[], None]
    ) -> None: ...


@dataclass(frozen=True)
class Accepted:
    ledger: LedgerReport


# The outer's verdict on the inner's ledger report: None to serve, or why it refuses.
LedgerCheck = Callable[[LedgerReport], "str | None"]


@dataclass(frozen=True)
class Delivered:
    content: FrameContent
    stats: FrameStats
    wire_bytes: int  # uplink bytes of this frame


@dataclass(frozen=True)
class Rejected:
    frame_no: int
    reason: str
    resend_from: int | None  # set when this rejection starts a mismatch: send RESEND(it)


@dataclass(frozen=True)
class Ended:
    reason: EndReason


@dataclass(frozen=True)
class Failed:
    kind: AlarmKind
    message: str


ReceiverEvent: TypeAlias = Accepted | Delivered | Rejected | Ended | Failed


class UplinkReceiver:
    """Uplink bytes -> events, for one connection (module doc). Not thread-safe: one caller."""

    def __init__(
        self,
        fingerprint: dict[str, str],
        decoder: FrameSink,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        check_ledger: LedgerCheck | None = None,
    ) -> None:
        """`check_ledger`: judges the inner's ledger report (`link.outer_link`); None accepts
        every report."""
        self.fingerprint = dict(fingerprint)
        self._check_ledger = check_ledger
        self.decoder = decoder
        if not 1 <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ConfigError(f"max_frame_bytes must be in 1..{MAX_FRAME_BYTES}")
        self.max_frame_bytes = max_frame_bytes
        self._parser = UplinkParser(len(fingerprint))
        self._stream = bytearray()  # frame-stream bytes not yet decoded
        self._resync = False  # skipping to the RESYNC marker after a rejected frame
        self._marked = False  # the next message follows a RESYNC marker (END must)
        self._skipped = 0  # bytes skipped since the last rejection
        self._ended = False
        self.state = LinkState.HANDSHAKING
        self.reason = "waiting for the inner's verdict"
        self.delivered = 0
        self.rejected = 0
        self.mismatches = 0
        self._mismatch_run = 0  # mismatches since the last coded frame decoded
        self._rejected_waiting = 0

    def receive(self, data: bytes) -> list[ReceiverEvent]:
        """Feed uplink bytes; the events they complete, in order."""
        if self.state is LinkState.FAILED:
            return []
        try:
            messages = self._parser.feed(data)
        except ProtocolError as e:
            # Messages complete before the bad bytes are dropped with them: the stream is
            # not trusted past an error, and nothing from it is delivered.
            return self.fail(AlarmKind.PROTOCOL, f"malformed uplink: {e}")
        events: list[ReceiverEvent] = []
        for msg in messages:
            events += self._message(msg)
            if self.state is LinkState.FAILED:
                return events
        return events + self._drain(final=False)

    @property
    def incomplete(self) -> bool:
        """Bytes wait that may begin a longer frame: call `expire()` if no more come within
        `INCOMPLETE_PATIENCE_S`."""
        return bool(self._stream) and not (self._resync or self._ended or self.state.final)

    def expire(self) -> list[ReceiverEvent]:
        """No bytes came for `INCOMPLETE_PATIENCE_S`: judge the waiting bytes as they are."""
        if not self.incomplete:
            return []
        return self._drain(final=True)

    def eof(self) -> list[ReceiverEvent]:
        """The uplink connection ended."""
        if self.state is LinkState.FAILED:
            return []
        try:
            self._parser.eof()
        except ProtocolError as e:
            return self.fail(AlarmKind.PROTOCOL, f"truncated uplink: {e}")
        if self.state is LinkState.HANDSHAKING:
            return self.fail(AlarmKind.CLOSED, "the uplink closed before the inner's verdict")
        if self.state is LinkState.SERVING:
            if self._stream and not self._resync:
                return self.fail(
                    AlarmKind.PROTOCOL, f"truncated uplink: it ended inside a frame"
                    f" ({len(self._stream)} bytes)",
                )  # fmt: skip
            return self.fail(
                AlarmKind.CLOSED,
                "the uplink closed without END: the inner stopped (crashed, was killed, or a"
                " budget refused a charge before it could say so)",
            )
        return []

    def fail(self, kind: AlarmKind, message: str) -> list[ReceiverEvent]:
        """Fail the link (also for reasons the caller saw, e.g. bytes on the downlink)."""
        if self.state is LinkState.FAILED:
            return []
        self.state, self.reason = LinkState.FAILED, message
        return [Failed(kind, message)]

    def _message(self, msg: object) -> list[ReceiverEvent]:
        # The parser allows a verdict only first, and nothing after a refusal.
        if isinstance(msg, FrameBytes):  # only after the ledger report
            self._stream += msg.data
            return []
        if isinstance(msg, LedgerReport):  # the parser allows it only right after an accept
            return self._ledger(msg)
        if isinstance(msg, Refuse):
            lines = refused_differences(self.fingerprint, msg.fields)
            return self.fail(
                AlarmKind.FINGERPRINT,
                "the inner refused to serve: codec fingerprints differ: " + "; ".join(lines),
            )
        assert isinstance(msg, Accept)
        ours = fingerprint_digest(self.fingerprint)
        if msg.digest != ours:
            return self.fail(
                AlarmKind.FINGERPRINT,
                f"the inner accepted, but its fingerprint digest {msg.digest.hex()} is not"
                f" ours ({ours.hex()}): decoding would not be exact",
            )
        self.reason = "waiting for the inner's ledger report"
        return []

    def _ledger(self, report: LedgerReport) -> list[ReceiverEvent]:
        refusal = self._check_ledger(report) if self._check_ledger is not None else None
        if refusal is not None:
            return self.fail(AlarmKind.LEDGER, refusal)
        self.state, self.reason = LinkState.SERVING, "serving"
        return [Accepted(report)]

    def _drain(self, *, final: bool) -> list[ReceiverEvent]:
        """Decode every whole message in the frame stream (module doc)."""
        events: list[ReceiverEvent] = []
        while self._stream and self.state is LinkState.SERVING:
            if self._resync:
                events += self._skip_to_marker()
                if self._resync or not self._stream:
                    break
            elif self._stream.startswith(RESYNC):  # END's marker
                if self._marked:
                    events += self.fail(AlarmKind.PROTOCOL, "two RESYNC markers in a row")
                    break
                del self._stream[: len(RESYNC)]
                self._marked = True
                continue
            got = self._decode(final)
            if got is None:
                break
            events += got
        if self._ended and self._stream:
            events += self.fail(AlarmKind.PROTOCOL, f"{len(self._stream)} bytes after END")
        return events

    def _skip_to_marker(self) -> list[ReceiverEvent]:
        """Drop bytes up to and including RESYNC (then `_resync` is off); fail the link if
        the inner sends too much before it."""
        at = self._stream.find(RESYNC)
        if at >= 0:
            self._skipped += at
            del self._stream[: at + len(RESYNC)]
            self._resync, self._marked = False, True
            return []
        drop = max(0, len(self._stream) - (len(RESYNC) - 1))  # it may be split across reads
        self._skipped += drop
        del self._stream[:drop]
        if self._skipped > MAX_REJECTED_WHILE_WAITING * self.max_frame_bytes:
            return self.fail(
                AlarmKind.DECODER,
                f"{self._skipped:,} bytes skipped waiting for the resend of frame"
                f" {self.decoder.awaiting_resend}: the inner does not resend",
            )
        return []

    def _decode(self, final: bool) -> list[ReceiverEvent] | None:
        """The message the stream begins with, as events; None until more bytes come."""
        frame_no = self.decoder.frame_no
        waiting = self.decoder.awaiting_resend
        window = self.max_frame_bytes + _LOOKAHEAD_BYTES  # all a frame's decoding can read
        final = final or len(self._stream) >= window
        try:
            got = self.decoder.decode_next(bytes(self._stream[:window]), final=final)
        except DecodeMismatch as e:
            self.rejected += 1
            self._resync = True  # where the frame ends is not known: skip to the marker
            if waiting is not None:
                return [Rejected(frame_no, str(e), None)]
            self.mismatches += 1
            self._mismatch_run += 1
            self._skipped = 0
            if self._mismatch_run > MAX_MISMATCHES_IN_A_ROW:
                return self.fail(
                    AlarmKind.DECODER,
                    f"{self._mismatch_run} decode mismatches in a row, each after a resend: the"
                    f" two sides do not compute the same weak-model numbers ({e})",
                )
            return [Rejected(frame_no, str(e), self.decoder.awaiting_resend)]
        except Exception as e:  # a decoder bug must not take the outer down: fail closed
            return self.fail(AlarmKind.INTERNAL, f"frame {frame_no}: decoder failed: {e!r}")
        if got is None:
            return None
        marked, self._marked = self._marked, False
        if isinstance(got, EndMessage):
            del self._stream[: got.bytes]
            if not marked:
                return self.fail(AlarmKind.PROTOCOL, "END without its RESYNC marker")
            return self._end(got.reason)
        content, stats = got
        del self._stream[: stats.bytes]
        if not stats.raw:
            self._mismatch_run = 0
        self.delivered += 1
        return [Delivered(content, stats, stats.bytes)]

    def _end(self, code: int) -> list[ReceiverEvent]:
        try:
            reason = EndReason(code)
        except ValueError:
            return self.fail(AlarmKind.PROTOCOL, f"unknown END reason {code}")
        self._ended = True
        if reason is EndReason.ERROR:
            return [Ended(reason), *self.fail(AlarmKind.INNER_ERROR, "the inner failed (END)")]
        if reason.exhausted:
            self.state = LinkState.EXHAUSTED
            self.reason = f"upload budget exhausted ({reason.name.lower().replace('_', '-')})"
        else:
            self.state, self.reason = LinkState.CLOSED, "the inner stopped as asked"
        return [Ended(reason)]
