"""Crash safety: kill -9 a real sender at random instants; the ledger never under-charges.

A sender process charges a SQLite ledger and writes frames with `MeteredWriter` to a TCP
server run by this test, as fast as 1 ms ticks allow. The test kills it with SIGKILL at a random
instant, many times, and after each kill checks that the ledger (reopened, as after a restart)
has charged at least every byte the receiver got.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sys
from pathlib import Path

from uplimit.link.budget import Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import MeteredReader, ReceiveCounter

ROUNDS = 40

_SENDER = """
import asyncio, random, sys
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import MeteredWriter

async def main(path, port):
    link = await MeteredWriter.connect("127.0.0.1", port, SqliteLedger(path), tick_s=0.001)
    print("connected", flush=True)
    rng = random.Random()
    while True:
        await link.send(rng.randbytes(rng.randint(1, 4000)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_kill_9_never_leaves_bytes_uncharged(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.db"
    SqliteLedger(ledger_path, Budgets(10**12)).close()
    counter = ReceiveCounter(tmp_path / "received.db")
    received = 0
    open_connections = 0
    rng = random.Random(4)  # the instants are random; the seed makes a failure reproducible

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received, open_connections
        open_connections += 1
        metered = MeteredReader(reader, counter)
        try:
            while data := await metered.read():
                received += len(data)
        finally:
            open_connections -= 1
            writer.close()

    async def main() -> list[tuple[int, int]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rounds = []
        for i in range(ROUNDS):
            argv = ["-c", _SENDER, str(ledger_path), str(port)]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, stdout=asyncio.subprocess.PIPE
            )
            if i % 5:  # most kills land while frames flow; every fifth while starting up
                assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"connected\n"
            await asyncio.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            # A connection still in the accept backlog is counted in a later round: every byte
            # it carries was charged before this kill, so "charged >= received" holds anyway.
            async with asyncio.timeout(10):
                while open_connections:  # the kernel closes a dead sender's socket: EOF
                    await asyncio.sleep(0.01)
            ledger = SqliteLedger(ledger_path)  # reopened, as after a restart
            charged = ledger.usage().wire_bytes
            ledger.close()
            assert charged >= received, f"round {i}: {received - charged} bytes uncharged"
            rounds.append((charged, received))
        server.close()
        await server.wait_closed()
        return rounds

    rounds = asyncio.run(main())
    assert counter.total() == received  # the outer's own durable count agrees
    counter.close()
    steps = list(itertools.pairwise([(0, 0), *rounds]))
    with_traffic = sum(1 for (_, r0), (_, r1) in steps if r1 > r0)
    # Charged in a round but never received: the kill fell between a charge and its write.
    unsent = [(c1 - c0) - (r1 - r0) for (c0, r0), (c1, r1) in steps]
    print(
        f"\n{ROUNDS} kill -9 rounds, {with_traffic} with traffic; after every one the ledger"
        f" had charged >= what the receiver got (finally {rounds[-1][0]:,} >= {received:,}"
        f" bytes); {sum(1 for u in unsent if u)} rounds left a charged frame unsent"
        f" (at most {max(unsent):,} bytes)"
    )
    assert with_traffic >= ROUNDS // 2  # the kills did land while frames were flowing
