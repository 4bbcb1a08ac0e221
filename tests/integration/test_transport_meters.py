"""`uplimit meters`: the three meters side by side, as a real command on real files (and a real
kernel meter where there is root and nft); exit 1 when they disagree."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from uplimit.link.agreement import Readings, checks
from uplimit.link.budget import Budgets, Usage
from uplimit.link.kernel import KernelReading
from uplimit.link.ledger import LedgerState, SqliteLedger
from uplimit.link.meter import ReceiveCounter

UPLIMIT = str(Path(sys.executable).with_name("uplimit"))


def meters(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UPLIMIT, "meters", *args], capture_output=True, text=True, timeout=60, check=False
    )


def said(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def files(tmp_path: Path, charged: int, received: int) -> list[str]:
    with SqliteLedger(tmp_path / "ledger.db", Budgets(10_000)) as ledger:
        ledger.charge(charged, timing_bytes=8)
    counter = ReceiveCounter(tmp_path / "received.db")
    counter.add(received)
    counter.close()
    return ["--ledger", str(tmp_path / "ledger.db"), "--received", str(tmp_path / "received.db")]


def test_meters_that_agree_exit_0_and_show_the_figures(tmp_path):
    done = meters(*files(tmp_path, 500, 480))  # 20 bytes charged and not (yet) received
    assert done.returncode == 0, done.stdout + done.stderr
    assert "500" in done.stdout and "480" in done.stdout and "DISAGREE" not in done.stdout


def test_more_received_than_charged_is_a_disagreement(tmp_path):
    args = files(tmp_path, 500, 501)
    done = meters(*args)
    assert done.returncode == 1
    assert (
        "DISAGREE received <= charged: the outer read 501 bytes, the ledger charged 500 (1 over)"
        in said(done.stdout)
    )
    report = json.loads(meters(*args, "--json").stdout)
    assert not report["agree"] and report["received_bytes"] == 501
    assert report["ledger"]["wire_bytes"] == 500 and report["ledger"]["timing_bytes"] == 8


def test_a_meter_that_is_not_there_is_an_error_not_a_zero(tmp_path):
    args = files(tmp_path, 1, 1)
    done = meters(*args[:2], "--received", str(tmp_path / "missing.db"))
    assert done.returncode == 2 and "does not exist" in said(done.stderr)
    done = meters(*args, "--counter", "other")
    assert done.returncode == 2 and "no count named 'other'" in said(done.stderr)
    done = meters("--ledger", args[1], "--budget", "nope")
    assert done.returncode == 2 and "budget 'nope' is missing" in said(done.stderr)


def test_slack_tolerates_retransmissions_at_the_kernel():
    state = LedgerState("link", Budgets(1000), Usage(108), 100, 8, 2, None, None)
    reading = KernelReading(
        quota_bytes=4000, quota_used_bytes=300, sent_bytes=300, sent_packets=4,
        dropped_bytes=0, dropped_packets=0, ctl_bytes=104, ctl_packets=2,
        tcp_payload_bytes=140, other_bytes=0, other_packets=0, served_bytes=0, served_packets=0,
        refused_bytes=0, refused_packets=0,
    )  # fmt: skip
    found = {c.name: c.ok for c in checks(Readings(state, 100, reading, "x"))}
    assert found == {
        "received <= charged": True,
        "kernel payload <= charged": False,  # 140 > 100: a retransmission, or a leak
        "received <= kernel payload": True,
        "charged <= lifetime budget": True,
        "kernel dropped nothing": True,
        "kernel refused nothing": True,
    }
    assert all(c.ok for c in checks(Readings(state, 100, reading, "x"), slack_bytes=40))


# A compromised inner: it writes to the outer without its meter (no ledger charge).
_METERLESS = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"x" * int(sys.argv[3]))
s.close()
"""


def test_a_writer_around_the_meter_shows_at_the_kernel_and_the_outer(tmp_path, kernel_meter):
    km = kernel_meter(50_000)
    with SqliteLedger(tmp_path / "ledger.db", Budgets(10_000)) as ledger:
        ledger.charge(100, note="what the honest path charged")
    counter = ReceiveCounter(tmp_path / "received.db")
    with socket.create_server((km.outer_address, 0)) as server:
        server.settimeout(30)

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1 << 16):
                    counter.add(len(data))

        rx = threading.Thread(target=receive)
        rx.start()
        port = str(server.getsockname()[1])
        km.run([sys.executable, "-c", _METERLESS, km.outer_address, port, "3000"], timeout=60)
        rx.join(30)
        assert not rx.is_alive(), "the receiver did not see the sender's EOF in 30 s"
    counter.close()
    done = meters(
        "--ledger", str(tmp_path / "ledger.db"), "--received", str(tmp_path / "received.db"),
        "--kernel", km.name, "--json",
    )  # fmt: skip
    assert done.returncode == 1
    report = json.loads(done.stdout)
    verdicts = {c["name"]: c["ok"] for c in report["checks"]}
    assert verdicts == {
        "received <= charged": False,  # 3000 read, 100 charged
        "kernel payload <= charged": False,  # 3000 left the namespace uncharged
        "received <= kernel payload": True,  # and it did pass the kernel meter
        "charged <= lifetime budget": True,
        "kernel dropped nothing": True,
        "kernel refused nothing": True,
    }
    assert report["kernel"]["tcp_payload_bytes"] == report["received_bytes"] == 3000
    assert report["kernel"]["ctl_packets"] >= 2  # SYN and FIN at least, counted apart
