"""kill -9 trials: a sender (the inner's `MeteredWriter`) or a receiver (the outer's
`MeteredReader` + `ReceiveCounter`) killed at a random instant; after each kill the ledger,
reopened as after a restart, must have charged at least what the receive counter counted.

Victims are processes forked from a forkserver that has already imported uplimit (a trial
costs milliseconds to start, not an interpreter's start-up), so 1,000 trials take minutes:
- inner, "charge": small frames, so most of its time (and most kills) is in the ledger's commit;
- inner, "write": 64-256 KiB frames to a reader that takes 4 KiB per millisecond, so most of its
  time is in the socket write;
- outer, "receive": the receiving process is killed while the sender streams to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from uplimit.errors import LinkClosed
from uplimit.link.ledger import open_ledger
from uplimit.link.meter import MeteredReader, MeteredWriter, ReceiveCounter

__all__ = ["Tally", "run_trials"]

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["uplimit.link.ledger", "uplimit.link.meter", "support.crash"])

FRAMES = {"charge": (1, 4000), "write": (64 << 10, 256 << 10), "receive": (1, 4000)}


@dataclass
class Tally:
    trials: int = 0
    with_traffic: int = 0  # trials in which the receiver got bytes
    under_charges: int = 0  # trials after which received > charged: must stay 0
    worst_over: int = 0  # the largest amount one trial left charged but never received


def _sender(where: str, name: str, port: int, moment: str, ready: Connection) -> None:
    with contextlib.suppress(LinkClosed):  # its receiver was killed first (an outer trial)
        asyncio.run(_send(where, name, port, *FRAMES[moment], ready))


async def _send(
    where: str, name: str, port: int, smallest: int, largest: int, ready: Connection
) -> None:
    ledger = open_ledger(where, name=name, link="crash-sender")
    link = await MeteredWriter.connect("127.0.0.1", port, ledger, tick_s=0.001)
    ready.send("connected")
    rng = random.Random()
    while True:
        await link.send(rng.randbytes(rng.randint(smallest, largest)))


def _receiver(counter_path: str, ready: Connection) -> None:
    asyncio.run(_receive(counter_path, ready))


async def _receive(counter_path: str, ready: Connection) -> None:
    counter = ReceiveCounter(counter_path)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        metered = MeteredReader(reader, counter)
        with contextlib.suppress(ConnectionError):
            while await metered.read():
                pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


def run_trials(where: str, name: str, victim: str, moment: str, n: int, workdir: Path) -> Tally:
    """`n` kill -9 trials of `victim` ("inner" or "outer") on the budget `name` at `where`."""
    return asyncio.run(_trials(where, name, victim, moment, n, workdir))


async def _trials(where: str, name: str, victim: str, moment: str, n: int, workdir: Path) -> Tally:
    counter_path = workdir / "received.db"
    tally = Tally()
    rng = random.Random(4)  # the instants are random; the seed makes a failure reproducible
    before = (0, 0)  # (charged, received) after the last trial
    local = ReceiveCounter(counter_path) if victim == "inner" else None
    open_connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        open_connections += 1
        metered = MeteredReader(reader, local)  # type: ignore[arg-type]
        try:
            while await metered.read(4096 if moment == "write" else 1 << 16):
                if moment == "write":
                    await asyncio.sleep(0.001)  # a slow reader: the sender waits in its write
        except ConnectionError:
            pass
        finally:
            open_connections -= 1
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0) if victim == "inner" else None
    try:
        for i in range(n):
            receiver = None
            if server is not None:
                port = server.sockets[0].getsockname()[1]
            else:
                mine, theirs = _CTX.Pipe()
                receiver = _CTX.Process(target=_receiver, args=(str(counter_path), theirs))
                receiver.start()
                port = await asyncio.to_thread(mine.recv)
            mine, theirs = _CTX.Pipe()
            sender = _CTX.Process(target=_sender, args=(where, name, port, moment, theirs))
            sender.start()
            # Most kills land while frames flow; every fifth inner kill while it starts up.
            if i % 5 or receiver:
                await asyncio.wait_for(asyncio.to_thread(mine.recv), 30)
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            (receiver or sender).kill()
            await asyncio.to_thread((receiver or sender).join)
            sender.kill()  # an outer trial: the sender goes too (the link is dead anyway)
            await asyncio.to_thread(sender.join)
            async with asyncio.timeout(10):
                while open_connections:  # the kernel closes a dead sender's socket: EOF
                    await asyncio.sleep(0.005)
            ledger = open_ledger(where, name=name)  # reopened, as after a restart
            charged = ledger.usage().wire_bytes
            ledger.close()
            counter = local or ReceiveCounter(counter_path)
            received = counter.total()
            if counter is not local:
                counter.close()
            tally.trials += 1
            tally.with_traffic += received > before[1]
            tally.under_charges += charged < received
            tally.worst_over = max(tally.worst_over, (charged - before[0]) - (received - before[1]))
            before = (charged, received)
    finally:
        if server is not None:
            server.close()
        if local is not None:
            local.close()
    return tally
