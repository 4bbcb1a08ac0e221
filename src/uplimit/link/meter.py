"""Meters at both ends of the uplink: the inner's charged writer, the outer's own count.

`MeteredWriter` is the only way the inner side writes to the uplink. Each `send(frame)`:

1. picks the next tick (one frame per tick, `budget.DEFAULT_TICK_S`);
2. charges the ledger `len(frame)` plus the timing surcharge for that tick, durably (and, if
   that took past the tick's start, the extra timing cost of the later tick it will use);
3. only then, at the tick's start, writes the frame and drains it.

If the charge fails for any reason (a budget refused, the ledger failed, the task was
cancelled) nothing is written and the uplink is closed for good: fail closed. A crash between
2 and 3 leaves bytes charged and unsent, so the ledger can over-charge, never under-charge.
`MeteredWriter.connect` charges `CONNECT_CHARGE_BYTES` before it connects (the instant of a
connection is a signal too; see `budget`).

Frames must be self-delimiting (the wire format says where each ends); the timing charge
relies on it (see `budget`).

`ReceiveCounter` is the outer side's count of uplink bytes received, in its own SQLite file.
`MeteredReader` commits each chunk's size (fsync) before it returns the chunk, so nothing the
outer acts upon goes uncounted: after a crash the count can only miss bytes the outer had
received from the kernel but not yet handed on (the kernel meter counts those). At the uplink's
rate (a frame per 100 ms tick) an fsync per chunk costs nothing worth batching.

`ReceiveBudget` is the outer's own lifetime budget over that count, enforced whatever the
inner does: a read asks for no more than what is left (less what other reads in flight were
granted), so the count never passes the budget, not by one byte; once nothing is left a read
raises `BudgetExhausted` without touching the socket. It can span several counts of one file
(the outer counts what an uplink sends before it proved itself apart: `link.outer_link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from uplimit.errors import BudgetExhausted, ConfigError, LedgerError, LinkClosed
from uplimit.link._sqlite import connect_durable
from uplimit.link.budget import (
    CONNECT_CHARGE_BYTES,
    DEFAULT_TICK_S,
    TimingState,
    timing_charge,
)
from uplimit.link.ledger import ChargeReceipt, Ledger

__all__ = ["MeteredReader", "MeteredWriter", "ReceiveBudget", "ReceiveCounter", "unproved"]


# How an end opens a connection: `asyncio.open_connection`'s signature.
OpenConnection = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class MeteredWriter:
    """Charged, tick-paced frame writer for the inner side (module doc).

    Build it with `connect`; wrapping an already-open writer skips the connection charge.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        ledger: Ledger,
        *,
        tick_s: float = DEFAULT_TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not tick_s > 0:
            raise ConfigError(f"tick length must be > 0 s, got {tick_s!r}")
        self._writer = writer
        self._ledger = ledger
        self._tick_s = tick_s
        self._clock = clock
        self._t0 = clock()  # tick 0: the connection
        self._timing = TimingState()
        self._lock = asyncio.Lock()  # one frame at a time, in tick order
        self._failure: BaseException | None = None
        self.sent_bytes = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        ledger: Ledger,
        *,
        tick_s: float = DEFAULT_TICK_S,
        clock: Callable[[], float] = time.monotonic,
        open_connection: OpenConnection = asyncio.open_connection,
    ) -> MeteredWriter:
        """Charge the connection, then open it (`open_connection(host, port)`: asyncio's, or a
        `link.memory.MemoryNetwork`'s)."""
        await asyncio.to_thread(
            ledger.charge, 0, timing_bytes=CONNECT_CHARGE_BYTES, note=f"connect {host}:{port}"
        )
        try:
            _, writer = await open_connection(host, port)
        except OSError as e:
            raise LinkClosed(f"cannot connect the uplink to {host}:{port}: {e}") from e
        return cls(writer, ledger, tick_s=tick_s, clock=clock)

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def last_tick(self) -> int:
        """The tick of the last frame written (0: none yet; tick 0 is the connection)."""
        return self._timing.last_tick

    def tick_time(self, tick: int) -> float:
        """When `tick` begins, on this writer's clock."""
        return self._t0 + tick * self._tick_s

    def until_next_tick(self) -> float:
        """Seconds until the next tick begins (the frame loop polls just after each start)."""
        return max(0.0, self.tick_time(self._next_tick()) - self._clock())

    def _next_tick(self) -> int:
        now = self._clock()
        return max(self._timing.last_tick + 1, math.ceil((now - self._t0) / self._tick_s))

    async def _charge(self, n_bytes: int, timing_bytes: int, note: str) -> ChargeReceipt:
        try:
            # In a thread: the commit waits for an fsync. If this task is cancelled the charge
            # still completes and nothing is written: an over-charge.
            return await asyncio.to_thread(
                self._ledger.charge, n_bytes, timing_bytes=timing_bytes, note=note
            )
        except BaseException as e:
            self._fail(e)
            raise

    async def send(
        self, frame: bytes | bytearray | memoryview, *, note: str = "", last: bool = False
    ) -> ChargeReceipt:
        """Charge, then write, one frame at the next tick; on any failure close the uplink.
        `last` (END): every later send raises LinkClosed, so nothing follows it on the wire,
        not even a frame another task was about to send."""
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise ConfigError(f"a frame is bytes, not {type(frame).__name__}")
        # An immutable copy: what is written is exactly what was charged, even if the caller's
        # buffer changes while the charge is committed (and a memoryview's len() is not bytes).
        frame = bytes(frame)
        if not frame:
            raise ConfigError("a frame is at least one byte")
        async with self._lock:
            if self._failure is not None:
                raise LinkClosed(f"uplink closed: {self._failure!r}") from self._failure
            # Charge before the boundary, so the frame leaves on it rather than an fsync later.
            tick = self._next_tick()
            paid, timing = timing_charge(self._timing, tick)
            receipt = await self._charge(len(frame), paid, note)
            # If the charge overran the boundary the frame goes at a later tick, after a longer
            # silence that costs more: pay the difference first (rare: an fsync takes
            # milliseconds, a tick 100).
            while (late := self._next_tick()) > tick:
                tick = late
                owed, timing = timing_charge(self._timing, tick)
                if owed > paid:
                    await self._charge(0, owed - paid, f"{note} (late by a tick)")
                    paid = owed
            delay = self.tick_time(tick) - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self._timing = timing
            self._writer.write(frame)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self._fail(e)
                raise LinkClosed(f"uplink write failed: {e}") from e
            self.sent_bytes += len(frame)
            if last:
                self._failure = LinkClosed("END was sent")
            return receipt

    def _fail(self, cause: BaseException) -> None:
        # Everything already written was charged, so flushing it on close is fine.
        self._failure = cause
        self._writer.close()

    async def aclose(self) -> None:
        """Close the uplink (no more frames); waits until the connection is closed."""
        async with self._lock:
            if self._failure is None:
                self._failure = LinkClosed("closed by its owner")
            self._writer.close()
        # The peer may have gone first; nothing is left to flush either way.
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


_SEEN_TABLE = (
    "CREATE TABLE IF NOT EXISTS uplimit_ledger_seen (name TEXT PRIMARY KEY,"
    " ledger_id TEXT NOT NULL, charged_bytes BIGINT NOT NULL, received_bytes BIGINT NOT NULL,"
    " at DOUBLE PRECISION NOT NULL)"
)


class ReceiveCounter:
    """Durable count of uplink bytes the outer side received, in its own SQLite file."""

    def __init__(self, path: str | Path, *, name: str = "uplink") -> None:
        self.path = Path(path)
        self.name = name
        self._lock = threading.Lock()
        self._db = connect_durable(self.path)
        self._write(
            "CREATE TABLE IF NOT EXISTS uplimit_received (name TEXT PRIMARY KEY,"
            " bytes BIGINT NOT NULL, chunks BIGINT NOT NULL, updated_at DOUBLE PRECISION)",
            (),
        )
        self._write(
            "INSERT INTO uplimit_received VALUES (?, 0, 0, NULL) ON CONFLICT (name) DO NOTHING",
            (name,),
        )
        self._write(_SEEN_TABLE, ())

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise LedgerError(f"receive counter {self.path}: {e}") from e

    def add(self, n_bytes: int) -> None:
        """Count `n_bytes` received; durable (fsync'd) when this returns."""
        if n_bytes < 0:
            raise ConfigError(f"cannot count {n_bytes} bytes")
        self._write(
            "UPDATE uplimit_received SET bytes = bytes + ?, chunks = chunks + 1, updated_at = ?"
            " WHERE name = ?",
            (n_bytes, time.time(), self.name),
        )

    def total(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT bytes FROM uplimit_received WHERE name = ?", (self.name,)
            ).fetchone()
        return row[0]

    # The inner's ledger as the outer last saw it at a handshake (`link.outer_link`).

    def seen_ledger(self) -> tuple[str, int, int] | None:
        """(ledger id, its total, this count then) from the last accepted handshake, or None
        before the first."""
        with self._lock:
            row = self._db.execute(
                "SELECT ledger_id, charged_bytes, received_bytes FROM uplimit_ledger_seen"
                " WHERE name = ?",
                (self.name,),
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def record_ledger(self, ledger_id: str, charged_bytes: int, received_bytes: int) -> None:
        self._write(
            "INSERT INTO uplimit_ledger_seen VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE"
            " SET ledger_id = excluded.ledger_id, charged_bytes = excluded.charged_bytes,"
            " received_bytes = excluded.received_bytes, at = excluded.at",
            (self.name, ledger_id, charged_bytes, received_bytes, time.time()),
        )

    def close(self) -> None:
        self._db.close()


class ReceiveBudget:
    """The outer's lifetime receive budget over the sum of `ReceiveCounter`s (module doc)."""

    def __init__(self, counters: tuple[ReceiveCounter, ...], budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
            raise ConfigError(f"the receive budget must be an int >= 1, got {budget_bytes!r}")
        self.counters = counters
        self.budget_bytes = budget_bytes
        self._granted = 0  # to reads in flight, not yet counted

    def received(self) -> int:
        return sum(c.total() for c in self.counters)

    def left(self) -> int:
        return self.budget_bytes - self.received() - self._granted

    def grant(self, n: int, keep: int = 0) -> int:
        """Up to `n` of the bytes left beyond `keep` (for another reader), held until
        `settle`; raises once none are left."""
        k = min(n, self.left() - keep)
        if k <= 0:
            raise BudgetExhausted(
                f"the outer's receive budget of {self.budget_bytes:,} bytes is spent"
                f" ({self.received():,} received)",
                limit="lifetime",
            )
        self._granted += k
        return k

    def settle(self, granted: int) -> None:
        """A read granted `granted` bytes is over (what it received is counted by now)."""
        self._granted -= granted


def unproved(counter: ReceiveCounter) -> ReceiveCounter:
    """The count, in `counter`'s file, of what uplinks sent before they proved themselves."""
    return ReceiveCounter(counter.path, name=f"{counter.name}-unproved")


def proofs(counter: ReceiveCounter) -> ReceiveCounter:
    """The count, in `counter`'s file, of the proofs that succeeded: the authenticated inner's
    upload too (its ledger charged them), already counted in `unproved`."""
    return ReceiveCounter(counter.path, name=f"{counter.name}-proofs")


class MeteredReader:
    """The outer side's uplink reader: counts each chunk durably before returning it; with a
    `budget`, reads only what is left of it beyond `keep` bytes (another reader's)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        counter: ReceiveCounter,
        budget: ReceiveBudget | None = None,
        *,
        keep: int = 0,
    ) -> None:
        self._reader = reader
        self._counter = counter
        self._budget = budget
        self._keep = keep

    async def _count(self, data: bytes) -> bytes:
        if data:
            await asyncio.to_thread(self._counter.add, len(data))
        return data

    async def read(self, n: int = 1 << 16) -> bytes:
        """Up to `n` bytes (b"" at end of stream), counted; raises `BudgetExhausted` when the
        budget has none left."""
        if self._budget is None:
            return await self._count(await self._reader.read(n))
        granted = self._budget.grant(n, self._keep)
        try:
            return await self._count(await self._reader.read(granted))
        finally:
            self._budget.settle(granted)

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes, counted; a short read at end of stream is counted, then raised."""
        try:
            data = await self._reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            await self._count(e.partial)
            raise
        return await self._count(data)
