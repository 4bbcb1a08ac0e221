"""The outer's end of the link (`link.transport` draws both): `OuterLink`.

It accepts one inner: connections only from `allowed` addresses, and a downlink becomes the
link's only after the inner proved it holds the shared secret (`link.auth`: the challenge
goes down, the proof comes up the uplink, which must come from the downlink's address; other
connections are closed and alarmed). It counts every byte read from the inner on either connection
(`MeteredReader` into the `ReceiveCounter`: bytes on the downlink are an upload that bypassed
the meter, and fail the link), enforces its own lifetime receive budget on that count
(`ReceiveBudget`: when it is spent the outer reads nothing more and fails the link, whatever
the inner's ledger says), refuses any frame longer than the stream table can need
(`max_frame_bytes`, `wire.frame.max_frame_bytes`) before reading it, decodes frames with the
frame decoder, delivers decoded frames
only, asks for resends, and keeps `state` (`wire.receiver.LinkState`): a gateway answers 503
unless it is `serving`. Alarms go to the log (ERROR), `alarms`, the metrics and `on_alarm`.
Nothing the inner sends can raise out of the outer's tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from uplimit.errors import BudgetExhausted, ConfigError, InvalidRequest, LinkClosed, ProtocolError
from uplimit.link.alarms import Alarm, AlarmHook, raise_alarm
from uplimit.link.auth import (
    CHALLENGE_MAGIC,
    MAX_PENDING,
    NONCE_BYTES,
    RESPONSE_BYTES,
    inner_proof,
    new_nonce,
    outer_proof,
    proof_matches,
)
from uplimit.link.meter import MeteredReader, ReceiveBudget, ReceiveCounter, proofs, unproved
from uplimit.link.metrics import OuterMetrics
from uplimit.link.transport import HANDSHAKE_TIMEOUT_S, READ_BYTES
from uplimit.wire.fingerprint import fingerprint_sha256, vocabulary_size
from uplimit.wire.frame import FrameContent, FrameStats
from uplimit.wire.protocol import (
    DOWNLINK_PREAMBLE,
    ByteRate,
    Cancel,
    DownlinkLimits,
    DownlinkMessage,
    Hello,
    LedgerReport,
    ModelData,
    ModelOffer,
    OpenStream,
    Resend,
    Shutdown,
    Switch,
    accepted_downlink,
    encode_downlink,
)
from uplimit.wire.receiver import (
    INCOMPLETE_PATIENCE_S,
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

__all__ = ["DOWNLINK_GRACE_S", "FrameHook", "OuterLink", "StartServer"]

# When the downlink goes (the inner closed it, or a write failed), the uplink's END or end of
# stream says why; an inner that leaves its uplink open this long without one has failed.
DOWNLINK_GRACE_S = 10.0

# The inner ends the link when the downlink outruns its limits (`DownlinkLimits`), so the outer
# paces every byte it sends down (streams, cancels, a rollout's model) with one token bucket:
# 9/10 of the inner's rate and half its burst. Bytes sent apart but read together (network
# delay) then stay within the inner's bucket for delays up to burst / (1.8 x rate): 4.4 s at
# the defaults. A request that must wait for the bucket waits; it is never sent early.
DOWNLINK_PACE = 0.9

FrameHook = Callable[[FrameContent, FrameStats], None]  # must not raise
# How the outer listens: `asyncio.start_server`'s signature (handler, host, port).
StartServer = Callable[..., Awaitable[Any]]


@dataclass(eq=False)
class _Candidate:
    """A downlink waiting for its inner to prove itself (`link.auth`)."""

    peer: str
    nonce: bytes
    proved: asyncio.Future[bytes] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )  # the inner's nonce, once its proof came up an uplink


def _address(writer: asyncio.StreamWriter) -> str:
    """The peer's address, canonical when it is an IP address (`link.auth.allowed_addresses`)."""
    host = str(writer.get_extra_info("peername")[0])
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:  # an in-memory end (`link.memory`)
        return host


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
        budget_bytes: int,
        max_frame_bytes: int,
        secret: bytes,
        allowed: frozenset[str],
        metrics: OuterMetrics | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        downlink_grace_s: float = DOWNLINK_GRACE_S,
        downlink_limits: DownlinkLimits | None = None,
    ) -> None:
        """`budget_bytes`: the outer's lifetime receive budget over `counter` (there is no
        unlimited); `max_frame_bytes`: `wire.frame.max_frame_bytes` of the coding config;
        `secret`, `allowed`: the link's secret and the inner's addresses (`link.auth`).
        `downlink_limits`: what the inner's downlink parser enforces (the same
        configuration); a stream it would refuse is refused here instead (`open_stream`)."""
        self.fingerprint = dict(fingerprint)
        self._downlink_limits = limits = downlink_limits or DownlinkLimits()
        # Every byte sent down waits for this bucket (`_send_down_bytes`).
        self._pace = ByteRate(
            DOWNLINK_PACE * limits.bytes_per_s, limits.burst_bytes // 2, time.monotonic()
        )
        self._pacing = asyncio.Lock()  # first come, first sent
        self._decoder = decoder
        self._receiver = UplinkReceiver(
            fingerprint, decoder, max_frame_bytes=max_frame_bytes, check_ledger=self._check_ledger
        )
        self._received_before = 0  # the counter when the inner's uplink connected
        self._counter = counter
        # What uplinks send before they proved themselves (`_prove`) is counted apart: it
        # counts against the budget, but it is not the authenticated inner's upload, which
        # `counter` holds (`uplimit meters` compares that one with the ledger).
        self._unproved = unproved(counter)
        self._proofs = proofs(counter)  # for the ledger check: the inner's ledger charged them
        self._budget = ReceiveBudget((counter, self._unproved), budget_bytes)
        self._secret = secret
        self.allowed = allowed  # the inner's addresses; change it only before `start`
        self._candidates: list[_Candidate] = []
        self._on_frame = on_frame
        self._on_alarm = on_alarm
        self.metrics = metrics
        if metrics is not None:
            metrics.set_budget(budget_bytes, self._budget.received())
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
        self.inner_confined: bool | None = None  # the inner's claim at the handshake
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
        if self._budget.left() <= 0:  # spent by an earlier run: take no inner at all
            await self._budget_spent()

    async def _budget_spent(self) -> None:
        await self._fail(
            AlarmKind.RECEIVE_BUDGET,
            f"the outer's receive budget of {self._budget.budget_bytes:,} bytes is spent"
            f" ({self._budget.received():,} bytes received); reading nothing more",
        )

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
        """Add a stream to the decoder's table, then send it down (with its service fields).

        A stream the inner's downlink parser would refuse (a parameter or prompt past the
        protocol's limits) would make the inner end the link for every user: it raises
        InvalidRequest instead, and nothing is added or sent."""
        self._require_serving()
        if self._downlink_gone:  # the link is ending: leave the decoder's table alone
            raise LinkClosed(self._downlink_gone)
        try:
            data = accepted_downlink(
                OpenStream(spec, extra), self._downlink_limits, vocabulary_size(self.fingerprint)
            )
        except (ConfigError, ProtocolError) as e:
            raise InvalidRequest(f"the inner would refuse this stream: {e}") from e
        async with self._ordering:
            async with self._decoding:
                self._decoder.add_stream(spec)
            await self._send_down_bytes(data)

    async def send_model(self, msg: ModelOffer | ModelData) -> None:
        """A rollout's transfer (`outer.rollout`); the caller paces it to the downlink's rate."""
        self._require_serving()
        await self._send_down(msg)

    async def switch_weak(
        self, switch_decoder: Callable[[], None], fingerprint: dict[str, str]
    ) -> None:
        """From this point in the stream order, both sides code new streams with the new weak
        model (`wire.frame`): `switch_decoder` switches this side's decoder (between frames),
        then SWITCH goes down; `fingerprint` is the codec's after the switch."""
        self._require_serving()
        async with self._ordering:
            async with self._decoding:
                switch_decoder()
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
        await self._send_down_bytes(encode_downlink(msg))

    async def _send_down_bytes(self, data: bytes) -> None:
        async with self._pacing:
            while not self._pace.take(len(data), time.monotonic()):
                await asyncio.sleep(len(data) / self._pace.rate)
            await self._send_down_paced(data)

    async def _send_down_paced(self, data: bytes) -> None:
        if self._down is None or self._down.is_closing() or self._downlink_gone:
            raise LinkClosed(self._downlink_gone or "the downlink is not connected")
        try:
            await self._send_down_raw(data)
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

    def _refuse_connection(self, writer: asyncio.StreamWriter, which: str, why: str) -> None:
        peer = writer.get_extra_info("peername")
        writer.close()
        self._alarm(
            AlarmKind.CONNECTION, f"closed a connection to the {which} port from {peer}: {why}"
        )

    def _admit(self, writer: asyncio.StreamWriter, which: str) -> str | None:
        """The peer's address if a connection may go on to the challenge, else None (closed,
        unread, and alarmed)."""
        peer = _address(writer)
        if peer not in self.allowed:
            self._refuse_connection(writer, which, "not one of the inner's addresses")
        elif self.state is not LinkState.HANDSHAKING or self._down is not None:
            self._refuse_connection(writer, which, "the link has its inner")
        elif which == "downlink" and len(self._candidates) >= MAX_PENDING:
            self._refuse_connection(writer, which, f"{MAX_PENDING} downlinks wait already")
        else:
            return peer
        return None

    async def _challenge(self, writer: asyncio.StreamWriter, peer: str) -> bytes | None:
        """Send a downlink its challenge; once the inner's proof came up an uplink (`_prove`),
        the outer's proof to send down; None (alarmed) if none did in time. Until then the
        downlink holds no slot."""
        candidate = _Candidate(peer, new_nonce())
        self._candidates.append(candidate)
        try:
            writer.write(CHALLENGE_MAGIC + candidate.nonce)
            await writer.drain()
            async with asyncio.timeout(self._handshake_timeout_s):
                nonce_i = await candidate.proved
            return outer_proof(self._secret, candidate.nonce, nonce_i)
        except TimeoutError:
            self._alarm(AlarmKind.AUTH, f"a downlink from {peer} was not proved in time")
        except LinkClosed as e:  # another downlink was proved, or the outer is closing
            if not self._closing:
                self._refuse_connection(writer, "downlink", f"never proved itself; {e}")
        except (ConnectionError, OSError):
            pass  # gone before it proved anything: nothing to say
        finally:
            self._candidates.remove(candidate)
        writer.close()
        return None

    async def _prove(self, metered: MeteredReader, peer: str) -> bool:
        """Read an uplink's response to a challenge (`link.auth`); True if it proves the
        secret for a downlink from the same address: that pair is the link's."""
        response = b""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(self._handshake_timeout_s):
                while len(response) < RESPONSE_BYTES and (
                    data := await metered.read(RESPONSE_BYTES - len(response))
                ):
                    self._received(len(data))
                    response += data
        if len(response) == RESPONSE_BYTES:
            nonce_i, proof = response[:NONCE_BYTES], response[NONCE_BYTES:]
            for candidate in self._candidates:
                expected = inner_proof(self._secret, candidate.nonce, nonce_i)
                matches = candidate.peer == peer and proof_matches(expected, proof)
                if matches and not self._up_connected:  # one uplink, one downlink: the first
                    self._up_connected = True
                    candidate.proved.set_result(nonce_i)
                    return True
        self._alarm(
            AlarmKind.AUTH,
            f"an uplink from {peer} failed the challenge ({len(response)} of {RESPONSE_BYTES}"
            " bytes; a wrong secret, or no downlink of its own)",
        )
        return False

    async def _on_downlink(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = self._admit(writer, "downlink")
        if peer is None:
            return
        proof = await self._challenge(writer, peer)
        if proof is None:
            return
        if self.state is not LinkState.HANDSHAKING:  # failed meanwhile (a spent budget)
            writer.close()
            return
        self._down = writer
        self._writers.append(writer)
        self.peer = peer
        for other in self._candidates:  # foreign ones: they will never be proved now
            if not other.proved.done():
                other.proved.set_exception(LinkClosed("the link has its inner"))
        self._spawn(self._handshake_deadline())
        try:
            await self._send_down_raw(
                proof + DOWNLINK_PREAMBLE + encode_downlink(Hello.of(self.fingerprint))
            )
            # Outer -> inner only: any byte the inner sends here bypassed its meter. One byte
            # proves it, and a pending read of one holds one byte of the receive budget.
            metered = MeteredReader(reader, self._counter, self._budget)
            data = await metered.read(1)
            if data:
                self._received(len(data))
                await self._fail(
                    AlarmKind.DOWNLINK_UPLOAD,
                    "the inner sent bytes on the downlink, bypassing its meter",
                )
            self._downlink_lost("the inner closed the downlink")
        except BudgetExhausted:
            await self._budget_spent()
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
        peer = self._admit(writer, "uplink")
        if peer is None:
            return
        # The downlink's watch (one byte, `_on_downlink`) keeps its byte of the budget.
        try:
            proved = await self._prove(
                MeteredReader(reader, self._unproved, self._budget, keep=1), peer
            )
        except BudgetExhausted:
            await self._budget_spent()
            proved = False
        if not proved:
            writer.close()
            return
        self._writers.append(writer)
        self._proofs.add(RESPONSE_BYTES)
        # All the authenticated inner ever uploaded, as its ledger counts it: proofs included.
        self._received_before = self._counter.total() + self._proofs.total()
        metered = MeteredReader(reader, self._counter, self._budget, keep=1)
        try:
            while True:
                try:
                    data = await self._read_uplink(metered)
                except BudgetExhausted:
                    await self._budget_spent()
                    break
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

    async def _read_uplink(self, metered: MeteredReader) -> bytes:
        """The next uplink bytes. While the receiver holds what may be the start of a longer
        frame, every `INCOMPLETE_PATIENCE_S` without more bytes it judges them as they are
        (`wire.receiver`); the read is never cancelled, so no counted byte is lost."""
        read = asyncio.ensure_future(metered.read(READ_BYTES))
        try:
            while True:
                patience = INCOMPLETE_PATIENCE_S if self._receiver.incomplete else None
                done, _ = await asyncio.wait({read}, timeout=patience)
                if done:
                    return read.result()
                async with self._decoding:
                    events = await asyncio.to_thread(self._receiver.expire)
                await self._handle(events)
                if self.state is LinkState.FAILED:  # nothing more is read from this uplink
                    return b""
        finally:
            read.cancel()  # a no-op once it is done

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
                case Accepted(report):
                    self._ledger_accepted(report)
                case Ended():
                    pass
        if self.metrics is not None:
            self.metrics.state.state(self.state.value)
        if self.state is LinkState.FAILED:
            self._close_connections()
        # A new event per change: a waiter that checked the state holds the current one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the handshake's ledger step: ids and totals (issue 15, item 3) --

    def _check_ledger(self, report: LedgerReport) -> str | None:
        """Refuse a link whose ledger has charged less than this outer has received: every
        byte received was charged first, so a lower total means the ledger was reset or
        swapped. For the ledger seen last time, its surplus (charged - received, at the
        handshake) can only grow: each byte received since was charged since, and the
        surplus (timing charges, frames charged but lost) is never paid back. A smaller
        one is a restored or rolled-back copy. Runs in the receiver's worker thread."""
        lid, charged, received = report.ledger_id.hex(), report.charged_bytes, self._received_before
        if received > charged:
            return (
                f"the inner's ledger {lid} has charged {charged:,} bytes, but this outer has"
                f" received {received:,}: a reset or swapped ledger; refusing the link"
            )
        seen = self._counter.seen_ledger()
        if seen is not None and seen[0] == lid and charged - received < seen[1] - seen[2]:
            return (
                f"the inner's ledger {lid} went back: {charged:,} bytes charged against"
                f" {received:,} received, where the last handshake saw {seen[1]:,} against"
                f" {seen[2]:,}: a restored or rolled-back ledger; refusing the link"
            )
        return None

    def _ledger_accepted(self, report: LedgerReport) -> None:
        """Remember the ledger; a new id is allowed (its total covers all received) but
        someone must see it. The confinement flag is the inner's own claim."""
        lid = report.ledger_id.hex()
        seen = self._counter.seen_ledger()
        if seen is not None and seen[0] != lid:
            self._alarm(
                AlarmKind.LEDGER,
                f"the inner's ledger id changed from {seen[0]} to {lid} ({report.charged_bytes:,}"
                f" bytes charged, {self._received_before:,} received): was it re-initialised?",
            )
        self._counter.record_ledger(lid, report.charged_bytes, self._received_before)
        self.inner_confined = report.confined
        if self.metrics is not None:
            self.metrics.inner_confined.set(int(report.confined))

    async def _fail(self, kind: AlarmKind, message: str) -> None:
        async with self._decoding:
            events = self._receiver.fail(kind, message)
        await self._handle(events)

    def _alarm(self, kind: AlarmKind, message: str) -> None:
        if self.metrics is not None:
            self.metrics.alarms.labels(kind.value).inc()
        raise_alarm(self.alarms, self._on_alarm, kind.value, message)

    def _close_connections(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()

    async def aclose(self) -> None:
        """Close everything; the state stays as it is."""
        self._closing = True
        for candidate in self._candidates:  # their handlers end now, not at their timeout
            if not candidate.proved.done():
                candidate.proved.set_exception(LinkClosed("the outer is closing"))
        self._close_connections()
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(OSError):
                await server.wait_closed()
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._unproved.close()
        self._proofs.close()
