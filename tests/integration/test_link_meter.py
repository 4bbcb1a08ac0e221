"""MeteredWriter and the receive counter, over real loopback TCP sockets."""

from __future__ import annotations

import array
import asyncio
import itertools
import socket
import threading
import time
from pathlib import Path

import pytest

from uplimit.errors import BudgetExhausted, ConfigError, LedgerError, LinkClosed
from uplimit.link.budget import CONNECT_CHARGE_BYTES, TIMING_UNIT, Budgets, timing_cost_units
from uplimit.link.ledger import ChargeReceipt, SqliteLedger
from uplimit.link.meter import MeteredReader, MeteredWriter, ReceiveCounter

TICK = 0.01


class Receiver:
    """A loopback server that keeps what arrives, with arrival times, counted durably."""

    def __init__(self, counter: ReceiveCounter) -> None:
        self.counter = counter
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = asyncio.Event()

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        metered = MeteredReader(reader, self.counter)
        while data := await metered.read():
            self.chunks.append((time.monotonic(), data))
        writer.close()
        self.eof.set()

    @property
    def data(self) -> bytes:
        return b"".join(c for _, c in self.chunks)


@pytest.fixture
def counter(tmp_path: Path) -> ReceiveCounter:
    c = ReceiveCounter(tmp_path / "received.db")
    yield c
    c.close()


def timing_bytes_for(ticks: list[int]) -> int:
    """What the timing charge of frames at these ticks adds up to (prepaid in whole bytes)."""
    gaps = [b - a - 1 for a, b in itertools.pairwise([0, *ticks])]
    units = sum(map(timing_cost_units, gaps, [0, *gaps]))  # each gap coded after the one before
    return -(-units // (8 * TIMING_UNIT))


def test_frames_are_charged_then_sent_at_ticks(tmp_path: Path, counter: ReceiveCounter) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(10_000))
    frames = [bytes([i]) * (10 + i) for i in range(6)]

    async def main() -> tuple[list[ChargeReceipt], list[int]]:
        async with Receiver(counter) as rx:
            link = await MeteredWriter.connect("127.0.0.1", rx.port, ledger, tick_s=TICK)
            receipts, ticks = [], []
            for f in frames:
                receipts.append(await link.send(f))
                # One frame per tick, written once its tick has begun.
                assert time.monotonic() >= link.tick_time(link.last_tick)
                # The frame loop's poll: the next tick starts within a tick.
                assert 0 < link.until_next_tick() <= TICK
                ticks.append(link.last_tick)
            await link.aclose()
            await asyncio.wait_for(rx.eof.wait(), 5)
            assert rx.data == b"".join(frames)
            assert all(a < b for a, b in itertools.pairwise([0, *ticks]))
            return receipts, ticks

    receipts, ticks = asyncio.run(main())
    state = ledger.usage()
    wire = sum(map(len, frames))
    assert state.wire_bytes == wire == counter.total()
    assert [r.n_bytes for r in receipts] == [len(f) for f in frames]
    # The connection, then the ticks' pattern. Back to back (~0.09 bit a frame) that is one
    # byte; a charge slower than a tick (a busy machine) moves a frame later and costs more.
    assert state.timing_bytes == CONNECT_CHARGE_BYTES + timing_bytes_for(ticks)
    if ticks == list(range(1, 7)):
        assert state.timing_bytes == CONNECT_CHARGE_BYTES + 1
    assert state.usage.lifetime_bytes == wire + state.timing_bytes
    assert ledger.charge_log()[0].note.startswith("connect 127.0.0.1:")


def test_silence_before_a_frame_is_charged(tmp_path: Path, counter: ReceiveCounter) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(10_000))

    async def main() -> tuple[list[int], list[int]]:
        async with Receiver(counter) as rx:
            link = await MeteredWriter.connect("127.0.0.1", rx.port, ledger, tick_s=TICK)
            timing, ticks = [], []
            for frame, pause in ((b"a", 0), (b"b", 0), (b"c", 300 * TICK)):
                await asyncio.sleep(pause)
                timing.append((await link.send(frame)).timing_bytes)
                ticks.append(link.last_tick)
            await link.aclose()
            await asyncio.wait_for(rx.eof.wait(), 5)
            return timing, ticks

    timing, ticks = asyncio.run(main())
    assert ticks[2] - ticks[1] > 256  # >= 256 silent ticks cost 5 + 17 bits: 2-3 more bytes
    assert timing[2] >= 2
    # Receipts show what was planned; a charge that overran its tick topped it up.
    assert ledger.usage().timing_bytes - CONNECT_CHARGE_BYTES == timing_bytes_for(ticks)


def test_a_refused_charge_writes_nothing_and_closes(
    tmp_path: Path, counter: ReceiveCounter
) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(CONNECT_CHARGE_BYTES + 1 + 100))

    async def main() -> None:
        async with Receiver(counter) as rx:
            link = await MeteredWriter.connect("127.0.0.1", rx.port, ledger, tick_s=TICK)
            await link.send(b"a" * 60)
            with pytest.raises(BudgetExhausted):
                await link.send(b"b" * 41)  # one byte too many
            assert link.closed
            with pytest.raises(LinkClosed):
                await link.send(b"c")
            await asyncio.wait_for(rx.eof.wait(), 5)  # the uplink was closed
            assert rx.data == b"a" * 60

    asyncio.run(main())
    assert ledger.usage().wire_bytes == 60 == counter.total()


class BrokenLedger:
    def charge(self, n_bytes: int, *, timing_bytes: int = 0, note: str = "") -> ChargeReceipt:
        raise LedgerError("disk on fire")


class SlowLedger:
    """Records charges, slowly (an fsync that takes a while)."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = delay_s
        self.charged: list[tuple[int, int]] = []
        self.started, self.landed = threading.Event(), threading.Event()

    def charge(self, n_bytes: int, *, timing_bytes: int = 0, note: str = "") -> ChargeReceipt:
        self.started.set()
        time.sleep(self.delay_s)
        self.charged.append((n_bytes, timing_bytes))
        self.landed.set()
        return ChargeReceipt(len(self.charged), n_bytes, timing_bytes, 0.0, 0, 0)


def test_a_failing_ledger_closes_the_link_before_any_byte(counter: ReceiveCounter) -> None:
    async def main() -> None:
        async with Receiver(counter) as rx:
            _, writer = await asyncio.open_connection("127.0.0.1", rx.port)
            link = MeteredWriter(writer, BrokenLedger(), tick_s=TICK)
            with pytest.raises(LedgerError):
                await link.send(b"secret")
            with pytest.raises(LinkClosed, match="disk on fire"):
                await link.send(b"secret")
            await asyncio.wait_for(rx.eof.wait(), 5)
            assert rx.data == b""

    asyncio.run(main())


def test_cancelled_mid_charge_over_charges_and_sends_nothing(counter: ReceiveCounter) -> None:
    ledger = SlowLedger()

    async def main() -> None:
        async with Receiver(counter) as rx:
            _, writer = await asyncio.open_connection("127.0.0.1", rx.port)
            link = MeteredWriter(writer, ledger, tick_s=TICK)
            task = asyncio.create_task(link.send(b"x" * 30))
            await asyncio.to_thread(ledger.started.wait)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert link.closed
            await asyncio.wait_for(rx.eof.wait(), 5)
            assert rx.data == b""
            # The charge in flight still lands.
            assert await asyncio.to_thread(ledger.landed.wait, 10)

    asyncio.run(main())
    assert ledger.charged == [(30, 1)]  # charged, never sent: an over-charge only


def test_a_charge_that_overruns_its_tick_pays_for_the_later_tick(counter: ReceiveCounter) -> None:
    ledger = SlowLedger(delay_s=0.1)  # ten ticks per charge

    async def main() -> int:
        async with Receiver(counter) as rx:
            _, writer = await asyncio.open_connection("127.0.0.1", rx.port)
            link = MeteredWriter(writer, ledger, tick_s=TICK)
            await link.send(b"x" * 30)
            assert time.monotonic() >= link.tick_time(link.last_tick)
            await link.aclose()
            await asyncio.wait_for(rx.eof.wait(), 5)
            assert rx.data == b"x" * 30
            return link.last_tick

    tick = asyncio.run(main())
    assert tick > 5  # the frame went out ticks later than first planned
    assert ledger.charged[0] == (30, 1)  # planned for tick 1: one byte of timing
    assert len(ledger.charged) >= 2 and all(n == 0 for n, _ in ledger.charged[1:])
    paid_units = sum(t for _, t in ledger.charged) * 8 * TIMING_UNIT
    assert paid_units >= timing_cost_units(tick - 1)  # the silence before it is paid for


def test_empty_or_non_bytes_frames_are_misuse(tmp_path: Path, counter: ReceiveCounter) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1000))

    async def main() -> None:
        async with Receiver(counter) as rx:
            link = await MeteredWriter.connect("127.0.0.1", rx.port, ledger, tick_s=TICK)
            for bad in (b"", "text", memoryview(b"")):
                with pytest.raises(ConfigError):
                    await link.send(bad)  # type: ignore[arg-type]
            assert not link.closed
            await link.send(b"ok")
            words = memoryview(array.array("i", [1, 2]))  # 2 items, 8 bytes: 8 are charged
            assert (await link.send(words)).n_bytes == 8
            await link.aclose()
            await asyncio.wait_for(rx.eof.wait(), 5)

    asyncio.run(main())
    assert counter.total() == 10 == ledger.usage().wire_bytes


def test_receive_counter_persists_and_counts_short_reads(tmp_path: Path) -> None:
    path = tmp_path / "received.db"
    counter = ReceiveCounter(path)

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"0123456789")
        reader.feed_eof()
        metered = MeteredReader(reader, counter)
        assert await metered.readexactly(4) == b"0123"
        with pytest.raises(asyncio.IncompleteReadError):
            await metered.readexactly(10)

    asyncio.run(main())
    assert counter.total() == 10
    counter.close()
    again = ReceiveCounter(path)
    assert again.total() == 10
    again.add(5)
    assert again.total() == 15
    again.close()


def test_a_failed_connect_is_a_link_error_and_stays_charged(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1000))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(LinkClosed, match="cannot connect"):
            asyncio.run(MeteredWriter.connect("127.0.0.1", port, ledger))
    assert ledger.usage().timing_bytes == CONNECT_CHARGE_BYTES  # charged before trying


def test_nothing_follows_the_last_frame(tmp_path: Path, counter: ReceiveCounter) -> None:
    """END goes with `last`: a frame another task sends after it (or was waiting to send
    behind it) is refused, uncharged, and never reaches the wire."""
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1000))

    async def main() -> None:
        async with Receiver(counter) as rx:
            link = await MeteredWriter.connect("127.0.0.1", rx.port, ledger, tick_s=TICK)
            end = asyncio.create_task(link.send(b"END", last=True))
            behind = asyncio.create_task(link.send(b"frame"))  # waits for the lock
            await end
            with pytest.raises(LinkClosed):
                await behind
            with pytest.raises(LinkClosed):
                await link.send(b"later")
            await link.aclose()
            await asyncio.wait_for(rx.eof.wait(), 5)
            assert rx.data == b"END"

    asyncio.run(main())
    assert ledger.usage().wire_bytes == 3
