"""The link's two TCP connections: thin asyncio shells around `wire.protocol` / `wire.receiver`.

    inner                                            outer (listens on two ports)
    InnerLink.connect ---- downlink connection ----> OuterLink   preamble, HELLO, OPEN_STREAM,
                     <--- (outer -> inner only) ---              CANCEL, RESEND, SHUTDOWN,
                                                                 MODEL_OFFER/DATA, SWITCH
                      ---- uplink connection ------> OuterLink   verdict, frames, END
                           (MeteredWriter only)

Handshake: the inner connects the downlink and reads the outer's fingerprint (HELLO); then
it connects the uplink (`MeteredWriter.connect`, which charges the connection) and sends its
verdict: accept, or refuse naming the fields that differ (`wire.fingerprint`).

Inner side (`InnerLink`, `serve_frames`):
- every uplink byte goes through `MeteredWriter`: charged durably, then written at a tick;
- nothing is ever written to the downlink connection (only its ACKs leave, in the kernel);
- the downlink is parsed strictly, size- and rate-limited (`DownlinkLimits`) and logged, one
  JSON line per message (`DownlinkLog`); a violation closes the link and raises an alarm;
- the budget fails closed, and says so: before each frame the inner checks that the frame
  leaves `END_RESERVE_BYTES` for an END message; when it does not, the inner sends END
  (reason: which budget) instead and stops. If another link sharing the budget takes those
  bytes first, the ledger refuses and the uplink just closes (the outer sees no END).

Outer side (`OuterLink`): accepts one inner (the uplink must come from the downlink's
address; other connections are closed and alarmed), counts every byte read from the inner on
either connection (`MeteredReader` into the `ReceiveCounter`: bytes on the downlink are an
upload that bypassed the meter, and fail the link), decodes frames with the frame decoder,
delivers decoded frames only, asks for resends, and keeps `state` (`wire.receiver.LinkState`):
a gateway answers 503 unless it is `serving`. Alarms go to the log (ERROR), `alarms`, the
metrics and `on_alarm`. Nothing the inner sends can raise out of the outer's tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from uplimit.errors import BudgetExhausted, ConfigError, LinkClosed, LinkError
from uplimit.link.alarms import Alarm, AlarmHook
from uplimit.link.budget import DEFAULT_TICK_S, Limit, decide
from uplimit.link.ledger import ChargeReceipt, Ledger
from uplimit.link.meter import MeteredReader, MeteredWriter, OpenConnection, ReceiveCounter
from uplimit.wire.fingerprint import (
    FingerprintMismatch,
    differences,
    fingerprint_digest,
    fingerprint_sha256,
    refusal_fields,
)
from uplimit.wire.frame import FrameContent, FrameStats
from uplimit.wire.protocol import (
    DOWNLINK_PREAMBLE,
    MAX_FRAME_BYTES,
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
    ModelData,
    ModelOffer,
    OpenStream,
    ProtocolError,
    Refuse,
    Resend,
    Shutdown,
    Switch,
    encode_downlink,
    encode_uplink,
)
from uplimit.wire.receiver import (
    Accepted,
    AlarmKind,
    Delivered,
    Ended,
    Failed,
    FrameSink,
    LinkState,
    ReceiverEvent,
    Rejected,
    UplinkReceiver,
)
from uplimit.wire.streams import StreamSpec

if TYPE_CHECKING:  # the inner side never loads the metrics (or prometheus-client)
    from uplimit.coding.calibration import Calibration
    from uplimit.link.metrics import OuterMetrics
    from uplimit.models.base import Session

__all__ = [
    "DOWNLINK_GRACE_S",
    "END_RESERVE_BYTES",
    "HANDSHAKE_TIMEOUT_S",
    "DownlinkLog",
    "FrameHook",
    "FrameSource",
    "InnerLink",
    "ModelSink",
    "OuterLink",
    "serve_frames",
]

log = logging.getLogger(__name__)

# What an honest inner keeps back so that END can always be paid for. A charge's timing part
# is at most T = 12 bytes (after up to 2**40 silent ticks, 3,500 years at 100 ms: 83 bits,
# plus a byte if the tick slips); END is 2 bytes plus its timing. The frame sent last left at
# least R - T, which must cover 2 + T: R >= 2 + 2T = 26.
END_RESERVE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 30.0  # connect, HELLO and verdict; longer means a peer is stuck
# When the downlink goes (the inner closed it, or a write failed), the uplink's END or end of
# stream says why; an inner that leaves its uplink open this long without one has failed.
DOWNLINK_GRACE_S = 10.0
_READ = 1 << 16

_END_FOR = {Limit.LIFETIME: EndReason.LIFETIME, Limit.PER_DAY: EndReason.PER_DAY}


def _raise_alarm(alarms: list[Alarm], hook: AlarmHook | None, kind: str, msg: str) -> None:
    alarm = Alarm(time.time(), kind, msg)
    alarms.append(alarm)
    log.error("ALARM %s on the link: %s", kind, msg)
    if hook is not None:
        hook(alarm)


# --- inner side -------------------------------------------------------------------------------


class DownlinkLog:
    """Everything that came down, one JSON object per line, flushed as written (inner side)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot open the downlink log {self.path}: {e}") from e

    def write(self, kind: str, **fields: object) -> None:
        self._file.write(json.dumps({"at": time.time(), "type": kind, **fields}) + "\n")
        self._file.flush()

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
        self._file.close()


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
        self.tick_s = tick_s
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
        log_path: str | Path,
        tick_s: float = DEFAULT_TICK_S,
        limits: DownlinkLimits | None = None,
        n_vocab: int | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        on_alarm: AlarmHook | None = None,
        open_connection: OpenConnection = asyncio.open_connection,
    ) -> InnerLink:
        """Connect both connections and shake hands; raises `FingerprintMismatch` (after
        sending the refusal up) if the outer's fingerprint differs from `fingerprint`.

        `n_vocab`: prompt token ids must be below it (default: the fingerprint's
        `frame.n_vocab`, when it has one).
        """
        if n_vocab is None and "frame.n_vocab" in fingerprint:
            n_vocab = int(fingerprint["frame.n_vocab"])
        downlink_log = DownlinkLog(log_path)
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
        )
        try:
            async with asyncio.timeout(handshake_timeout_s):
                await link._handshake(host, uplink_port, fingerprint, open_connection)
        except BaseException:
            await link.aclose()
            raise
        link._pump = asyncio.create_task(link._read_downlink())
        return link

    async def _handshake(
        self,
        host: str,
        uplink_port: int,
        fingerprint: dict[str, str],
        open_connection: OpenConnection,
    ) -> None:
        while not self._messages:
            data = await self._reader.read(_READ)
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
        self._uplink = await MeteredWriter.connect(
            host, uplink_port, self._ledger, tick_s=self.tick_s, open_connection=open_connection
        )
        if not diffs:
            await self._uplink.send(
                encode_uplink(Accept(fingerprint_digest(fingerprint))), note="accept"
            )
            return
        fields = refusal_fields(list(self.outer_fingerprint), diffs)
        await self._uplink.send(encode_uplink(Refuse(fields)), note="refuse")
        message = "codec fingerprints differ, refusing to serve: " + "; ".join(
            d.describe() for d in diffs
        )
        log.error("%s", message)
        self._log.write("refused", differences=[d.describe() for d in diffs])
        raise FingerprintMismatch(message, diffs)

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
            while data := await self._reader.read(_READ):
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
        _raise_alarm(self.alarms, self._on_alarm, "downlink", f"downlink violation: {e}")
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

    async def send_frame(self, frame: bytes) -> ChargeReceipt:
        """Send one coded frame (charged, at the next tick); if the budget cannot pay for it
        and for END, send END instead and raise `BudgetExhausted` (module doc)."""
        uplink = self._require_uplink()
        wire = encode_uplink(Frame(frame))
        need = len(wire) + END_RESERVE_BYTES
        while True:
            state = await asyncio.to_thread(self._ledger.usage)
            if state.exhausted_by is not None:  # latched: not even END can be paid for
                await self.aclose()
                raise BudgetExhausted(
                    f"upload budget exhausted ({state.exhausted_by.label})",
                    limit=state.exhausted_by.value,
                )
            refused = decide(state.budgets, state.usage, need, time.time()).refused
            if refused is None:
                return await uplink.send(wire, note=f"frame {len(frame)} B")
            per_second = state.budgets.per_second_bytes
            if refused is Limit.PER_SECOND and per_second is not None and need <= per_second:
                await asyncio.sleep(1.0 - time.time() % 1.0)  # room in the next second
                continue
            await self.end(_END_FOR.get(refused, EndReason.PER_SECOND))
            raise BudgetExhausted(
                f"upload budget exhausted: the {refused.label} budget cannot pay for a frame of"
                f" {len(wire):,} bytes and END; sent END",
                limit=refused.value,
            )

    async def end(self, reason: EndReason) -> None:
        """Send END (if the budget still allows) and close both connections."""
        if self._uplink is not None and not self._uplink.closed:
            with contextlib.suppress(LinkError):
                await self._uplink.send(encode_uplink(End(reason)), note=f"END {reason.name}")
        await self.aclose()

    def _require_uplink(self) -> MeteredWriter:
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
    """Where a rollout's downlink messages go, in order (`inner.rollout.WeakRollout`)."""

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
                        # Replaces any resend under way: this one starts where the decoder is.
                        resends = deque(await asyncio.to_thread(source.resend, first))
                    case Shutdown():
                        await link.end(EndReason.SHUTDOWN)
                        return EndReason.SHUTDOWN
            frame = resends.popleft() if resends else await asyncio.to_thread(source.next_frame)
            if frame is None:
                await link.wait(link.tick_s)  # idle: nothing is sent
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


# --- outer side -------------------------------------------------------------------------------

FrameHook = Callable[[FrameContent, FrameStats], None]  # must not raise
# How the outer listens: `asyncio.start_server`'s signature (handler, host, port).
StartServer = Callable[..., Awaitable[Any]]


class OuterLink:
    """The outer side of one link (module doc). `start` it, then `wait_serving`."""

    def __init__(
        self,
        fingerprint: dict[str, str],
        decoder: FrameSink,
        counter: ReceiveCounter,
        *,
        on_frame: FrameHook | None = None,
        on_alarm: AlarmHook | None = None,
        metrics: OuterMetrics | None = None,
        budget_bytes: int | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        downlink_grace_s: float = DOWNLINK_GRACE_S,
    ) -> None:
        self.fingerprint = dict(fingerprint)
        self._decoder = decoder
        self._receiver = UplinkReceiver(fingerprint, decoder, max_frame_bytes=max_frame_bytes)
        self._counter = counter
        self._on_frame = on_frame
        self._on_alarm = on_alarm
        self.metrics = metrics
        if metrics is not None and budget_bytes is not None:
            metrics.set_budget(budget_bytes, counter.total())
        self._handshake_timeout_s = handshake_timeout_s
        self._downlink_grace_s = downlink_grace_s
        # The decoder's stream table changes in two places (open_stream, decoding in a
        # worker thread); this lock keeps them apart.
        self._decoding = asyncio.Lock()
        # Held from a decoder change to its downlink message (OPEN_STREAM, SWITCH), so the
        # inner sees them in the order the decoder applied them.
        self._ordering = asyncio.Lock()
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._down: asyncio.StreamWriter | None = None
        self._downlink_gone: str | None = None  # why, once the downlink is lost
        self._closing = False
        self._up_connected = False
        self.peer: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.alarms: list[Alarm] = []
        self.delivered_frames = 0
        self.downlink_port = self.uplink_port = 0

    @property
    def state(self) -> LinkState:
        return self._receiver.state

    @property
    def reason(self) -> str:
        return self._receiver.reason

    @property
    def decoder(self) -> FrameSink:
        return self._decoder

    async def start(
        self,
        host: str,
        *,
        downlink_port: int = 0,
        uplink_port: int = 0,
        start_server: StartServer = asyncio.start_server,
    ) -> None:
        """Listen for the inner's two connections (port 0: any free port); `start_server`:
        asyncio's, or a `link.memory.MemoryNetwork`'s."""
        down = await start_server(self._on_downlink, host, downlink_port)
        up = await start_server(self._on_uplink, host, uplink_port)
        self._servers = [down, up]
        self.downlink_port = down.sockets[0].getsockname()[1]
        self.uplink_port = up.sockets[0].getsockname()[1]

    async def wait_serving(self, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Until the handshake succeeded; raises `LinkClosed` with the reason if it failed."""
        async with asyncio.timeout(timeout_s):
            while self.state is LinkState.HANDSHAKING:
                await self._changed.wait()
        if self.state is not LinkState.SERVING:
            raise LinkClosed(f"link {self.state}: {self.reason}")

    async def wait_final(self, timeout_s: float | None = None) -> LinkState:
        """Until the link is exhausted, closed or failed."""
        async with asyncio.timeout(timeout_s):
            while not self.state.final:
                await self._changed.wait()
        return self.state

    async def open_stream(self, spec: StreamSpec, extra: bytes = b"") -> None:
        """Add a stream to the decoder's table, then send it down (with its service fields)."""
        self._require_serving()
        if self._downlink_gone:  # the link is ending: leave the decoder's table alone
            raise LinkClosed(self._downlink_gone)
        async with self._ordering:
            async with self._decoding:
                self._decoder.add_stream(spec)
            await self._send_down(OpenStream(spec, extra))

    async def send_model(self, msg: ModelOffer | ModelData) -> None:
        """A rollout's transfer (`outer.rollout`); the caller paces it to the downlink's rate."""
        self._require_serving()
        await self._send_down(msg)

    async def switch_weak(
        self,
        weak_session: Session,
        calibration: Calibration,
        release: Callable[[], None],
        fingerprint: dict[str, str],
    ) -> None:
        """From this point in the stream order, both sides code new streams with the new weak
        model (`wire.frame`); `fingerprint` is the codec's after the switch."""
        self._require_serving()
        async with self._ordering:
            async with self._decoding:
                self._decoder.switch(weak_session, calibration, release)
            self.fingerprint = dict(fingerprint)
            await self._send_down(Switch(fingerprint_sha256(fingerprint)))

    async def cancel(self, stream_id: int) -> None:
        self._require_serving()
        await self._send_down(Cancel(stream_id))

    async def shutdown(self, timeout_s: float = 10.0) -> LinkState:
        """Ask the inner to stop (SHUTDOWN); wait for its END, then close."""
        if self.state is LinkState.SERVING:
            with contextlib.suppress(LinkClosed):
                await self._send_down(Shutdown())
            with contextlib.suppress(TimeoutError):
                await self.wait_final(timeout_s)
        await self.aclose()
        return self.state

    def _require_serving(self) -> None:
        if self.state is not LinkState.SERVING:
            raise LinkClosed(f"link {self.state}: {self.reason}")

    async def _send_down(self, msg: DownlinkMessage) -> None:
        if self._down is None or self._down.is_closing() or self._downlink_gone:
            raise LinkClosed(self._downlink_gone or "the downlink is not connected")
        try:
            await self._send_down_raw(encode_downlink(msg))
        except (ConnectionError, OSError) as e:
            self._downlink_lost(f"downlink write failed: {e}")
            raise LinkClosed(f"downlink write failed: {e}") from e

    def _downlink_lost(self, why: str) -> None:
        """The downlink is gone. The inner closes it when it ends, END first: give the uplink
        a grace period (`DOWNLINK_GRACE_S`) to say how the link ended before failing it."""
        if self._downlink_gone is not None or self.state.final or self._closing:
            return
        self._downlink_gone = why

        async def grace() -> None:
            with contextlib.suppress(TimeoutError):
                await self.wait_final(self._downlink_grace_s)
            if not self.state.final:
                await self._fail(AlarmKind.CLOSED, f"{why}, and the uplink did not end")

        self._spawn(grace())

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse_connection(self, writer: asyncio.StreamWriter, which: str) -> None:
        peer = writer.get_extra_info("peername")
        writer.close()
        self._alarm(AlarmKind.CONNECTION, f"closed an unexpected {which} connection from {peer}")

    async def _on_downlink(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._down is not None or self.state is not LinkState.HANDSHAKING:
            self._refuse_connection(writer, "downlink")
            return
        self._down = writer
        self._writers.append(writer)
        self.peer = writer.get_extra_info("peername")[0]
        self._spawn(self._handshake_deadline())
        try:
            await self._send_down_raw(
                DOWNLINK_PREAMBLE + encode_downlink(Hello.of(self.fingerprint))
            )
            # Outer -> inner only: any byte the inner sends here bypassed its meter.
            metered = MeteredReader(reader, self._counter)
            data = await metered.read()
            if data:
                self._received(len(data))
                await self._fail(
                    AlarmKind.DOWNLINK_UPLOAD,
                    f"the inner sent {len(data)} bytes on the downlink, bypassing its meter",
                )
            self._downlink_lost("the inner closed the downlink")
        except (ConnectionError, OSError) as e:
            self._downlink_lost(f"downlink connection failed: {e}")
        except Exception as e:  # never let a bug here pass silently or crash the server
            await self._fail(AlarmKind.INTERNAL, f"downlink: {e!r}")

    async def _send_down_raw(self, data: bytes) -> None:
        assert self._down is not None
        self._down.write(data)
        await self._down.drain()
        if self.metrics is not None:
            self.metrics.downlink_bytes.inc(len(data))

    async def _handshake_deadline(self) -> None:
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                while self.state is LinkState.HANDSHAKING:
                    await self._changed.wait()
        except TimeoutError:
            await self._fail(
                AlarmKind.TIMEOUT, f"no verdict from the inner in {self._handshake_timeout_s} s"
            )

    async def _on_uplink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if self._up_connected or self._down is None or peer != self.peer:
            self._refuse_connection(writer, "uplink")
            return
        self._up_connected = True
        self._writers.append(writer)
        metered = MeteredReader(reader, self._counter)
        try:
            while True:
                try:
                    data = await metered.read()
                except (ConnectionError, OSError) as e:
                    await self._fail(AlarmKind.CLOSED, f"uplink connection failed: {e}")
                    break
                self._received(len(data))
                async with self._decoding:
                    if data:
                        events = await asyncio.to_thread(self._receiver.receive, data)
                    else:
                        events = self._receiver.eof()
                await self._handle(events)
                if not data or self.state is LinkState.FAILED:
                    break
        except Exception as e:  # a bug on this side: fail closed, never crash
            await self._fail(AlarmKind.INTERNAL, f"uplink: {e!r}")
        finally:
            self._close_connections()

    def _received(self, n: int) -> None:
        if self.metrics is not None and n:
            self.metrics.received(n)

    async def _handle(self, events: list[ReceiverEvent]) -> None:
        for event in events:
            match event:
                case Delivered(content, stats, wire_bytes):
                    self.delivered_frames += 1
                    if self.metrics is not None:
                        self.metrics.frame(wire_bytes, stats.tokens)
                    if self._on_frame is not None:
                        self._on_frame(content, stats)
                case Rejected(frame_no, reason, resend_from):
                    if self.metrics is not None:
                        self.metrics.frames.labels("rejected").inc()
                    if resend_from is not None:
                        if self.metrics is not None:
                            self.metrics.mismatches.inc()
                        self._alarm(
                            AlarmKind.MISMATCH,
                            f"frame {frame_no} rejected, nothing of it delivered ({reason});"
                            f" asking for a resend from frame {resend_from}",
                        )
                        with contextlib.suppress(LinkClosed):
                            await self._send_down(Resend(resend_from))
                case Failed(kind, message):
                    self._alarm(kind, message)
                case Accepted() | Ended():
                    pass
        if self.metrics is not None:
            self.metrics.state.state(self.state.value)
        if self.state is LinkState.FAILED:
            self._close_connections()
        # A new event per change: a waiter that checked the state holds the current one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _fail(self, kind: AlarmKind, message: str) -> None:
        async with self._decoding:
            events = self._receiver.fail(kind, message)
        await self._handle(events)

    def _alarm(self, kind: AlarmKind, message: str) -> None:
        if self.metrics is not None:
            self.metrics.alarms.labels(kind.value).inc()
        _raise_alarm(self.alarms, self._on_alarm, kind.value, message)

    def _close_connections(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()

    async def aclose(self) -> None:
        """Close everything; the state stays as it is."""
        self._closing = True
        self._close_connections()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(OSError):
                await server.wait_closed()
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
