"""The inner's end of the link (`link.transport` draws both): `InnerLink` and `serve_frames`.

- the link is authenticated (`link.auth`): the inner answers the outer's challenge up the
  uplink (charged) and believes nothing the outer says before the outer's own proof;
- every uplink byte goes through `MeteredWriter`: charged durably, then written at a tick;
- nothing is ever written to the downlink connection (only its ACKs leave, in the kernel);
- the downlink is parsed strictly, size- and rate-limited (`DownlinkLimits`) and logged, one
  JSON line per message (`DownlinkLog`); a violation closes the link and raises an alarm;
- the budget fails closed, and says so: before each frame the inner checks that the frame
  leaves `END_RESERVE_BYTES` for an END message; when it does not, the inner sends END
  (reason: which budget) instead and stops. If another link sharing the budget takes those
  bytes first, the ledger refuses and the uplink just closes (the outer sees no END).
- a frame the per-second window refuses waits for the next second; after `STALL_LIMIT_S` of
  waiting (a window that does not roll over, a budget other links keep spending) the inner
  raises an alarm and sends END (per-second) rather than stall in silence. Windows are read on
  the ledger's clock (`budget.steady_time` unless injected); the wait is timed on the monotonic
  clock. A ledger day ahead of that clock (it was stepped back) raises a `clock` alarm, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import NoReturn, Protocol

from uplimit.errors import BudgetExhausted, ConfigError, LinkClosed, LinkError
from uplimit.link.alarms import Alarm, AlarmHook, raise_alarm
from uplimit.link.auth import (
    CHALLENGE_BYTES,
    CHALLENGE_MAGIC,
    PROOF_BYTES,
    inner_proof,
    new_nonce,
    outer_proof,
    proof_matches,
)
from uplimit.link.budget import DEFAULT_TICK_S, SECONDS_PER_DAY, Limit, decide, steady_time
from uplimit.link.ledger import ChargeReceipt, Ledger
from uplimit.link.meter import MeteredWriter, OpenConnection
from uplimit.link.transport import HANDSHAKE_TIMEOUT_S, READ_BYTES
from uplimit.wire.fingerprint import (
    FingerprintMismatch,
    differences,
    fingerprint_digest,
    refusal_fields,
    vocabulary_size,
)
from uplimit.wire.protocol import (
    Accept,
    ByteRate,
    Cancel,
    DownlinkLimits,
    DownlinkMessage,
    DownlinkParser,
    End,
    EndReason,
    Frame,
    Hello,
    LedgerReport,
    ModelData,
    ModelOffer,
    OpenStream,
    ProtocolError,
    Refuse,
    Resend,
    Resync,
    Shutdown,
    Switch,
    encode_downlink,
    encode_uplink,
)
from uplimit.wire.streams import StreamSpec

__all__ = [
    "END_RESERVE_BYTES",
    "STALL_LIMIT_S",
    "DownlinkLog",
    "FrameSource",
    "InnerLink",
    "ModelSink",
    "serve_frames",
]

log = logging.getLogger(__name__)

# What an honest inner keeps back so that END can always be paid for. A charge's timing part
# is at most T = 12 bytes (after up to 2**40 silent ticks, 3,500 years at 100 ms: 86 bits,
# plus a byte if the tick slips); END is 11 bytes (RESYNC and 3) plus its timing. The frame
# sent last left at least R - T, which must cover 11 + T: R >= 11 + 2T = 35.
END_RESERVE_BYTES = 40

# A frame that the per-second window has refused for this long ends the link (module doc).
STALL_LIMIT_S = 5.0

DOWNLINK_LOG_MAX_BYTES = 256 << 20  # an OPEN_STREAM's line is ~6 bytes a prompt token
DOWNLINK_LOG_BACKUPS = 4

_END_FOR = {Limit.LIFETIME: EndReason.LIFETIME, Limit.PER_DAY: EndReason.PER_DAY}


class DownlinkLog:
    """Everything that came down, one JSON object per line, flushed as written (inner side).

    Past `max_bytes` the file rotates (`path.1` .. `path.<backups>`, the oldest dropped; the
    standard library's `RotatingFileHandler`), so the log takes at most (backups + 1) x
    max_bytes of disk however long the link serves; `max_bytes` 0 never rotates. A write that
    fails raises (the serving loop ends the link): the log is never silently incomplete.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DOWNLINK_LOG_MAX_BYTES,
        backups: int = DOWNLINK_LOG_BACKUPS,
    ) -> None:
        self.path = Path(path)
        if max_bytes < 0 or backups < 0 or (max_bytes and not backups):
            raise ConfigError("the downlink log rotates past max_bytes >= 0 into backups >= 1")
        try:
            self._handler = _FailingFileHandler(
                self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        except OSError as e:
            raise ConfigError(f"cannot open the downlink log {self.path}: {e}") from e

    def write(self, kind: str, **fields: object) -> None:
        line = json.dumps({"at": time.time(), "type": kind, **fields})
        self._handler.handle(logging.makeLogRecord({"msg": line}))

    def message(self, msg: DownlinkMessage) -> None:
        size = len(encode_downlink(msg))  # encodings are canonical: the bytes that came
        match msg:
            case Hello():
                self.write("hello", bytes=size, fingerprint=msg.as_dict())
            case OpenStream(spec, extra):
                p = spec.params
                self.write(
                    "open_stream",
                    bytes=size,
                    stream_id=spec.stream_id,
                    prompt=list(spec.prompt),
                    temperature=p.temperature,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    seed=spec.seed,
                    max_tokens=spec.max_tokens,
                    extra=_printable(extra),
                )
            case Cancel(stream_id):
                self.write("cancel", bytes=size, stream_id=stream_id)
            case Resend(frame_no):
                self.write("resend", bytes=size, frame_no=frame_no)
            case Shutdown():
                self.write("shutdown", bytes=size)
            case ModelOffer(sha256, model_bytes, calibration):
                self.write(
                    "model_offer",
                    bytes=size,
                    sha256=sha256.hex(),
                    size=model_bytes,
                    calibration=_printable(calibration),
                )
            case ModelData(data):  # the file itself is kept by the rollout, not in the log
                self.write("model_data", bytes=size, length=len(data))
            case Switch(digest):
                self.write("switch", bytes=size, fingerprint_sha256=digest.hex())

    def close(self) -> None:
        # Each line was flushed as written: what is left is a failed write's, raised then.
        with contextlib.suppress(OSError):
            self._handler.close()


class _FailingFileHandler(RotatingFileHandler):
    """Raises what `logging` would print and swallow (a full disk, a vanished directory)."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called inside emit's `except`: its exception


def _printable(data: bytes) -> str:
    """`data` as text if it is (the service fields are JSON), else as hex."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "hex:" + data.hex()
    return text if text.isprintable() else "hex:" + data.hex()


class InnerLink:
    """The inner side of one link; build it with `connect` (module doc)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ledger: Ledger,
        downlink_log: DownlinkLog,
        limits: DownlinkLimits,
        *,
        n_vocab: int | None,
        tick_s: float,
        on_alarm: AlarmHook | None,
        confined: bool,
        clock: Callable[[], float],
        stall_limit_s: float,
    ) -> None:
        self._reader, self._down = reader, writer  # never written to: outer -> inner only
        self._ledger = ledger
        self._log = downlink_log
        self._parser = DownlinkParser(limits, n_vocab=n_vocab)
        self._rate = ByteRate(limits.bytes_per_s, limits.burst_bytes, time.monotonic())
        self._uplink: MeteredWriter | None = None
        self._messages: deque[DownlinkMessage] = deque()
        self._arrived = asyncio.Event()
        self._failure: LinkError | None = None  # why the downlink stopped
        self._pump: asyncio.Task[None] | None = None
        self._on_alarm = on_alarm
        self._confined = confined
        self.tick_s = tick_s
        self._clock = clock  # the ledger's, for the windows
        self._stall_limit_s = stall_limit_s
        self._clock_alarmed = False
        self.alarms: list[Alarm] = []
        self.outer_fingerprint: dict[str, str] = {}
        self._closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        downlink_port: int,
        uplink_port: int,
        ledger: Ledger,
        fingerprint: dict[str, str],
        *,
        secret: bytes,
        log_path: str | Path,
        log_max_bytes: int = DOWNLINK_LOG_MAX_BYTES,
        log_backups: int = DOWNLINK_LOG_BACKUPS,
        tick_s: float = DEFAULT_TICK_S,
        limits: DownlinkLimits | None = None,
        n_vocab: int | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        on_alarm: AlarmHook | None = None,
        open_connection: OpenConnection = asyncio.open_connection,
        confined: bool = False,
        clock: Callable[[], float] = steady_time,
        stall_limit_s: float = STALL_LIMIT_S,
    ) -> InnerLink:
        """Connect both connections and shake hands (`secret`: the link's, `link.auth`);
        raises `FingerprintMismatch` (after sending the refusal up) if the outer's fingerprint
        differs from `fingerprint`, `LinkClosed` if the outer fails the challenge.

        `n_vocab`: prompt token ids must be below it (default: the fingerprint's
        `frame.n_vocab`, when it has one). `confined`: what the ledger report tells the outer
        (this process runs in its namespace behind the kernel quota). `clock`: the ledger's
        (module doc).
        """
        if n_vocab is None:
            n_vocab = vocabulary_size(fingerprint)
        downlink_log = DownlinkLog(log_path, max_bytes=log_max_bytes, backups=log_backups)
        try:
            reader, writer = await open_connection(host, downlink_port)
        except OSError as e:
            downlink_log.close()
            raise LinkClosed(f"cannot connect the downlink to {host}:{downlink_port}: {e}") from e
        link = cls(
            reader,
            writer,
            ledger,
            downlink_log,
            limits or DownlinkLimits(),
            n_vocab=n_vocab,
            tick_s=tick_s,
            on_alarm=on_alarm,
            confined=confined,
            clock=clock,
            stall_limit_s=stall_limit_s,
        )
        try:
            async with asyncio.timeout(handshake_timeout_s):
                await link._authenticate(host, uplink_port, secret, open_connection)
                await link._handshake(fingerprint)
        except BaseException:
            await link.aclose()
            raise
        link._pump = asyncio.create_task(link._read_downlink())
        return link

    async def _authenticate(
        self, host: str, uplink_port: int, secret: bytes, open_connection: OpenConnection
    ) -> None:
        """`link.auth`: the outer's challenge, the uplink and the inner's proof up it (charged),
        then the outer's proof, checked before anything else from the outer is believed."""
        challenge = await self._read_exactly(CHALLENGE_BYTES, "its challenge")
        if not challenge.startswith(CHALLENGE_MAGIC):
            self._auth_failed("the outer's first bytes are not a challenge of protocol 1")
        nonce_o, nonce_i = challenge[len(CHALLENGE_MAGIC) :], new_nonce()
        self._log.write("challenge", bytes=CHALLENGE_BYTES)
        self._uplink = await MeteredWriter.connect(
            host, uplink_port, self._ledger, tick_s=self.tick_s, open_connection=open_connection
        )
        await self._uplink.send(nonce_i + inner_proof(secret, nonce_o, nonce_i), note="proof")
        proof = await self._read_exactly(PROOF_BYTES, "its proof")
        if not proof_matches(outer_proof(secret, nonce_o, nonce_i), proof):
            self._auth_failed("the outer's proof is wrong: it does not hold the link's secret")
        self._log.write("proof", bytes=PROOF_BYTES)

    async def _read_exactly(self, n: int, what: str) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise LinkClosed(f"the outer closed the downlink before {what}") from e

    def _auth_failed(self, why: str) -> NoReturn:
        self._log.write("refused", error=why)
        raise_alarm(self.alarms, self._on_alarm, "auth", why)
        raise LinkClosed(why)

    async def _handshake(self, fingerprint: dict[str, str]) -> None:
        while not self._messages:
            data = await self._reader.read(READ_BYTES)
            if not data:
                raise LinkClosed("the outer closed the downlink before its HELLO")
            try:
                self._take(data)
            except ProtocolError as e:
                self._violation(e)
                raise
        hello = self._messages.popleft()
        assert isinstance(hello, Hello)  # the parser lets only HELLO come first
        self.outer_fingerprint = hello.as_dict()
        diffs = differences(self.outer_fingerprint, fingerprint)
        uplink = self.uplink_writer()
        if not diffs:
            await uplink.send(encode_uplink(Accept(fingerprint_digest(fingerprint))), note="accept")
            await self._report_ledger()
            return
        fields = refusal_fields(list(self.outer_fingerprint), diffs)
        await uplink.send(encode_uplink(Refuse(fields)), note="refuse")
        message = "codec fingerprints differ, refusing to serve: " + "; ".join(
            d.describe() for d in diffs
        )
        log.error("%s", message)
        self._log.write("refused", differences=[d.describe() for d in diffs])
        raise FingerprintMismatch(message, diffs)

    async def _report_ledger(self) -> None:
        """The handshake's ledger step: the ledger's id and total (before this message) go
        up, so the outer can refuse a ledger that charged less than it received."""
        state = await asyncio.to_thread(self._ledger.usage)
        report = LedgerReport(bytes.fromhex(state.ledger_id), state.usage.lifetime_bytes,
                              self._confined)  # fmt: skip
        await self.uplink_writer().send(encode_uplink(report), note="ledger report")

    def _take(self, data: bytes) -> None:
        """Rate-check, parse and log downlink bytes; queue the messages."""
        if not self._rate.take(len(data), time.monotonic()):
            raise ProtocolError(
                f"downlink faster than {self._rate.rate:,.0f} bytes/s"
                f" (burst {self._rate.burst:,} bytes)"
            )
        for msg in self._parser.feed(data):
            self._log.message(msg)
            self._messages.append(msg)

    async def _read_downlink(self) -> None:
        try:
            while data := await self._reader.read(READ_BYTES):
                self._take(data)
                self._arrived.set()
            self._failure = LinkClosed("the outer closed the downlink")
        except ProtocolError as e:
            self._failure = e
            self._violation(e)
        except (ConnectionError, OSError) as e:
            self._failure = LinkClosed(f"downlink failed: {e}")
        self._arrived.set()

    def _violation(self, e: ProtocolError) -> None:
        """The outer broke the downlink's rules: log, alarm, stop listening to it."""
        self._log.write("violation", error=str(e))
        raise_alarm(self.alarms, self._on_alarm, "downlink", f"downlink violation: {e}")
        self._down.close()

    def pending(self) -> list[DownlinkMessage]:
        """Messages that came down since the last call; raises once they are all taken and
        the downlink has failed or closed."""
        if not self._messages and self._failure is not None:
            raise self._failure
        out = list(self._messages)
        self._messages.clear()
        self._arrived.clear()
        return out

    async def wait(self, timeout_s: float) -> None:
        """Until a downlink message arrives (or the downlink stops), at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()

    async def send_frame(self, frame: bytes, *, resync: bool = False) -> ChargeReceipt:
        """Send one coded frame (charged, at the next tick), after the RESYNC marker if
        `resync` (the first raw resend, `wire.protocol`); if the budget cannot pay for it
        and for END, send END instead and raise `BudgetExhausted` (module doc)."""
        uplink = self.uplink_writer()
        wire = encode_uplink(Frame(frame))
        if resync:
            wire = encode_uplink(Resync()) + wire
        need = len(wire) + END_RESERVE_BYTES
        waiting_since = None
        while True:
            state = await asyncio.to_thread(self._ledger.usage)
            if state.exhausted_by is not None:  # latched: not even END can be paid for
                await self.aclose()
                raise BudgetExhausted(
                    f"upload budget exhausted ({state.exhausted_by.label})",
                    limit=state.exhausted_by.value,
                )
            now = self._clock()
            self._check_clock(state.usage.day, now)
            refused = decide(state.budgets, state.usage, need, now).refused
            if refused is None:
                return await uplink.send(wire, note=f"frame {len(frame)} B")
            per_second = state.budgets.per_second_bytes
            if refused is Limit.PER_SECOND and per_second is not None and need <= per_second:
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since < self._stall_limit_s:
                    await asyncio.sleep(1.0 - self._clock() % 1.0)  # room in the next second
                    continue
                raise_alarm(
                    self.alarms, self._on_alarm, "stalled",
                    f"the per-second window refused a frame of {len(wire):,} bytes for"
                    f" {self._stall_limit_s} s (is the clock stuck?); sending END",
                )  # fmt: skip
            await self.end(_END_FOR.get(refused, EndReason.PER_SECOND))
            raise BudgetExhausted(
                f"upload budget exhausted: the {refused.label} budget cannot pay for a frame of"
                f" {len(wire):,} bytes and END; sent END",
                limit=refused.value,
            )

    def _check_clock(self, day: int, now: float) -> None:
        """The ledger's day ahead of its clock: the clock was stepped back (`budget.Usage.at`
        keeps the day's bytes); say so once per link."""
        if day > math.floor(now / SECONDS_PER_DAY) and not self._clock_alarmed:
            self._clock_alarmed = True
            raise_alarm(
                self.alarms, self._on_alarm, "clock",
                f"the ledger's day {day} is ahead of its clock ({now:.0f}): the clock was"
                " stepped back; the day keeps its bytes",
            )  # fmt: skip

    async def end(self, reason: EndReason) -> None:
        """Send END (if the budget still allows) and close both connections."""
        if self._uplink is not None and not self._uplink.closed:
            with contextlib.suppress(LinkError):
                await self._uplink.send(
                    encode_uplink(End(reason)), note=f"END {reason.name}", last=True
                )
        await self.aclose()

    def uplink_writer(self) -> MeteredWriter:
        """The uplink's metered writer (every byte through it is charged); raises LinkClosed
        once it is closed."""
        if self._uplink is None or self._uplink.closed:
            raise LinkClosed("the uplink is closed")
        return self._uplink

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._uplink is not None:
            await self._uplink.aclose()
        self._down.close()
        with contextlib.suppress(OSError):
            await self._down.wait_closed()
        self._log.close()


class FrameSource(Protocol):
    """What the inner's serving loop drives: streams in, coded frames out.

    Methods are called from a worker thread, one at a time, in downlink order.
    """

    def open_stream(self, spec: StreamSpec, extra: bytes) -> None:
        """A new stream, in the outer's order; `extra`: its service fields (OPEN_STREAM)."""
        ...

    def cancel(self, stream_id: int) -> None: ...

    def next_frame(self) -> bytes | None:
        """The next coded frame, or None when there is nothing to say this tick."""
        ...

    def resend(self, first: int) -> list[bytes]:
        """Raw copies of frames `first`.. (`FrameEncoder.resend`)."""
        ...


class ModelSink(Protocol):
    """Where a rollout's downlink messages go, in order (`link.rollout.WeakRollout`)."""

    def offer(self, offer: ModelOffer) -> None: ...

    def data(self, data: bytes) -> None: ...

    def switch(self, fingerprint_sha256: bytes) -> None:
        """Switch the source's weak model; raises if the new fingerprint is not this one."""
        ...


async def serve_frames(
    link: InnerLink, source: FrameSource, *, models: ModelSink | None = None
) -> EndReason:
    """The inner's loop: apply downlink messages, send a frame per tick while there is one,
    until SHUTDOWN (END sent) or the budget runs out. Returns why it ended; on any other
    failure (a rollout message without `models` among them) it sends END(error), closes, and
    raises."""
    resends: deque[bytes] = deque()
    resync = False
    try:
        while True:
            for msg in link.pending():
                match msg:
                    case ModelOffer() | ModelData() | Switch() if models is None:
                        raise ProtocolError("a model rollout, but this inner takes none")
                    case ModelOffer():
                        await asyncio.to_thread(models.offer, msg)
                    case ModelData(data):
                        await asyncio.to_thread(models.data, data)
                    case Switch(digest):
                        await asyncio.to_thread(models.switch, digest)
                    case OpenStream(spec, extra):
                        await asyncio.to_thread(source.open_stream, spec, extra)
                    case Cancel(stream_id):
                        await asyncio.to_thread(source.cancel, stream_id)
                    case Resend(first):
                        # Replaces any resend under way: this one starts where the decoder is,
                        # after the marker the outer skips to (it cannot tell where the frame
                        # it rejected ends).
                        resends = deque(await asyncio.to_thread(source.resend, first))
                        resync = True
                    case Shutdown():
                        await link.end(EndReason.SHUTDOWN)
                        return EndReason.SHUTDOWN
            if resends:
                await link.send_frame(resends.popleft(), resync=resync)
                resync = False
                continue
            frame = await asyncio.to_thread(source.next_frame)
            if frame is None:
                # Idle: nothing is sent. Ask again just after the next tick starts, so that
                # the source is polled once per tick (the scheduler's cadence counts on it).
                await link.wait(link.uplink_writer().until_next_tick())
                continue
            await link.send_frame(frame)
    except BudgetExhausted as e:
        await link.aclose()
        return _END_FOR.get(Limit(e.limit), EndReason.PER_SECOND)
    except (LinkClosed, asyncio.CancelledError):  # nobody to tell, or no way to: just stop
        await link.aclose()
        raise
    except Exception:
        await link.end(EndReason.ERROR)
        raise
