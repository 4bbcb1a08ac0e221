"""Budget exhaustion under concurrent load: several links (processes) share one lifetime budget
and send as fast as their ticks allow until it refuses. At no meter — the sender's ledger, the
receiver's own count, the kernel's quota counters — does the total pass the budget by one byte.

The kernel variant runs the links inside a kernel meter's namespace; it skips, saying why,
without root or nft.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from uplimit.link.budget import CONNECT_CHARGE_BYTES, Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import MeteredReader, ReceiveCounter

BUDGET = 150_000
MAX_FRAME = 2000
LINKS = 4

_LINK = """
import asyncio, random, sys
from uplimit.errors import BudgetExhausted
from uplimit.link.ledger import SqliteLedger
from uplimit.link.meter import MeteredWriter

async def main(path, host, port, seed, max_frame):
    ledger = SqliteLedger(path, link=f"link-{seed}")
    rng, link = random.Random(seed), None
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # all links start together
    try:
        link = await MeteredWriter.connect(host, port, ledger, tick_s=0.002)
        while True:
            await link.send(rng.randbytes(rng.randint(1, max_frame)))
    except BudgetExhausted:
        pass
    print(link.sent_bytes if link else 0, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


def _run_links(tmp_path: Path, host: str, wrap) -> tuple[SqliteLedger, int, ReceiveCounter, list]:
    """Start LINKS sender processes (argv through `wrap`), receive until they are all done."""
    ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(BUDGET))
    counter = ReceiveCounter(tmp_path / "received.db")
    received = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        metered = MeteredReader(reader, counter)
        while data := await metered.read():
            received += len(data)
        writer.close()

    async def main() -> list[int]:
        server = await asyncio.start_server(serve, host, 0)
        port = server.sockets[0].getsockname()[1]
        procs = []
        for seed in range(LINKS):
            argv = [sys.executable, "-c", _LINK, str(ledger.path), host, str(port), str(seed)]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *wrap([*argv, str(MAX_FRAME)]), stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
        for p in procs:
            assert await asyncio.wait_for(p.stdout.readline(), 30) == b"ready\n"
        for p in procs:
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        sent = [int(await asyncio.wait_for(p.stdout.readline(), 120)) for p in procs]
        for p in procs:
            assert await p.wait() == 0
        async with asyncio.timeout(10):  # until every connection has reached EOF
            while received < sum(sent):
                await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return sent

    sent = asyncio.run(main())
    return ledger, received, counter, sent


def _check(ledger: SqliteLedger, received: int, counter: ReceiveCounter, sent: list) -> None:
    state = ledger.usage()
    assert state.usage.lifetime_bytes <= BUDGET  # the ledger, timing surcharge included
    assert received <= BUDGET and counter.total() == received  # the receiver, both counts
    assert received == sum(sent)  # every byte written arrived
    # Charged and unsent: at most the frame each link had charged when a top-up for a late tick
    # was refused (an over-charge, never the other way).
    assert received <= state.wire_bytes <= received + LINKS * MAX_FRAME
    # SQLite's lock is not fair, so on a busy machine one link may be kept out throughout.
    assert sum(1 for n in sent if n) >= 2, "links really competed"
    assert BUDGET - state.usage.lifetime_bytes < MAX_FRAME + CONNECT_CHARGE_BYTES + 8
    assert {c.link for c in ledger.charge_log()} <= {f"link-{i}" for i in range(LINKS)}


def test_exhaustion_under_load(tmp_path: Path) -> None:
    ledger, received, counter, sent = _run_links(tmp_path, "127.0.0.1", lambda argv: argv)
    _check(ledger, received, counter, sent)
    print(
        f"\n{LINKS} links, budget {BUDGET:,}: ledger {ledger.usage().usage.lifetime_bytes:,}"
        f" (wire {ledger.usage().wire_bytes:,}), received {received:,}"
    )


def test_exhaustion_under_load_at_the_kernel_too(tmp_path: Path, kernel_meter) -> None:
    # The quota must not be what stops the links here: leave room for headers and ACKs.
    km = kernel_meter(4 * BUDGET)
    ledger, received, counter, sent = _run_links(tmp_path, km.outer_address, km.command)
    _check(ledger, received, counter, sent)
    reading = km.read()
    print(
        f"\n{LINKS} links in namespace {km.netns}, budget {BUDGET:,}: ledger"
        f" {ledger.usage().usage.lifetime_bytes:,} (wire {ledger.usage().wire_bytes:,}),"
        f" received {received:,}, kernel payload {reading.tcp_payload_bytes:,} in"
        f" {reading.sent_bytes:,} IP bytes / {reading.sent_packets} packets"
        f" ({reading.ctl_packets} payload-free, {reading.ctl_bytes:,} B)"
    )
    assert not reading.over_quota
    # The kernel saw every payload byte (more only if TCP retransmitted), never over budget.
    assert received <= reading.tcp_payload_bytes <= BUDGET
