"""The kernel meter: a namespace whose only way out is an nftables quota.

Skips, saying why, without root or nft (`kernel_meter` fixture, tests/conftest.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from uplimit.errors import ConfigError, KernelMeterError
from uplimit.link.kernel import Gate, KernelMeter, available

QUOTA = 40_000

# A compromised inner: no application meter, it tries to remove the quota, then floods.
_FLOOD = """
import socket, subprocess, sys
flush = subprocess.run(["nft", "flush", "ruleset"], capture_output=True)
print("flush", flush.returncode, flush.stderr.decode().strip().splitlines()[0], flush=True)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
sent, block = 0, b"x" * 4096
try:
    while sent < int(sys.argv[3]):
        sent += s.send(block)
except OSError:
    pass  # the quota drops everything now: the send buffer fills and stays full
print("sent", sent, flush=True)
"""


def _receive_all(server: socket.socket, got: list[int], idle_s: float = 2.0) -> None:
    conn, _ = server.accept()
    conn.settimeout(idle_s)
    with conn:
        try:
            while data := conn.recv(1 << 16):
                got[0] += len(data)
        except TimeoutError:
            pass  # nothing more gets through


def test_a_compromised_inner_cannot_pass_the_quota(kernel_meter) -> None:
    km = kernel_meter(QUOTA)
    with socket.create_server((km.outer_address, 0)) as server:
        server.settimeout(30)
        port = server.getsockname()[1]
        got = [0]
        rx = threading.Thread(target=_receive_all, args=(server, got))
        rx.start()
        flood = km.run(
            [sys.executable, "-c", _FLOOD, km.outer_address, str(port), str(5 * QUOTA)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        rx.join()
    lines = dict(line.split(" ", 1) for line in flood.stdout.splitlines())
    assert lines["flush"].startswith("1 ") and "not permitted" in lines["flush"], lines
    attempted = int(lines["sent"])
    reading = km.read()
    print(
        f"\nflood: {attempted:,} bytes written by a process without the meter; received"
        f" {got[0]:,}; kernel: quota {reading.quota_bytes:,} used {reading.quota_used_bytes:,},"
        f" passed {reading.sent_bytes:,} B in {reading.sent_packets} packets (payload"
        f" {reading.tcp_payload_bytes:,}, payload-free {reading.ctl_bytes:,} B), dropped"
        f" {reading.dropped_bytes:,} B in {reading.dropped_packets} packets"
    )
    assert attempted > QUOTA  # it really tried to send more
    assert got[0] < QUOTA  # what got out is under the quota, headers and all
    assert reading.sent_bytes < QUOTA
    assert reading.tcp_payload_bytes == got[0]  # the kernel's payload count is exact
    assert reading.quota_used_bytes == QUOTA and reading.over_quota
    assert reading.other_bytes == 0  # nothing but TCP left (IPv6 is off in the namespace)


_SINK = """
import socket, sys
with socket.create_server((sys.argv[1], 0)) as server:
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    n = 0
    while data := conn.recv(1 << 16):
        n += len(data)
print(n, flush=True)
"""


def test_acks_for_downlink_traffic_are_counted_apart(kernel_meter) -> None:
    """The inner only receives; everything it sends back is payload-free TCP (ACKs)."""
    km = kernel_meter(10**9)
    sink = km.popen(
        [sys.executable, "-c", _SINK, km.inner_address], stdout=subprocess.PIPE, text=True
    )
    port = int(sink.stdout.readline())
    downlink = 2_000_000
    with socket.create_connection((km.inner_address, port), timeout=30) as s:
        s.sendall(b"d" * downlink)
    assert int(sink.stdout.readline()) == downlink
    sink.wait(timeout=30)
    reading = km.read()
    print(
        f"\ndownlink {downlink:,} B: the inner sent {reading.ctl_packets} payload-free segments,"
        f" {reading.ctl_bytes:,} B (uplink bytes at the kernel, none of them payload)"
    )
    assert reading.tcp_payload_bytes == 0
    assert reading.ctl_packets > 0 and reading.sent_bytes == reading.ctl_bytes
    assert reading.other_bytes == 0


def _names_present(km: KernelMeter) -> list[str]:
    found = []
    if km.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        found.append(km.netns)
    for ifname in (km.outer_ifname, km.inner_ifname):
        if subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0:
            found.append(ifname)
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    if km.outer_address + "/" in addrs:
        found.append(km.outer_address)
    return found


def test_teardown_removes_everything_even_after_a_failure(missing) -> None:
    can = available()
    if not can.ok:
        missing("kernel", f"kernel meter unavailable: {can.reason}")
    km = KernelMeter("test-tdown", 1000)
    try:
        with pytest.raises(RuntimeError), km:
            assert set(_names_present(km)) == {km.netns, km.outer_ifname, km.outer_address}
            with pytest.raises(KernelMeterError, match="exists"):
                KernelMeter("test-tdown", 1000).create()  # a second one by that name
            km.popen(["sleep", "600"])  # left running inside: teardown must end it
            raise RuntimeError("the test body failed")
        assert _names_present(km) == []
    finally:
        km.teardown()


@pytest.mark.parametrize("name", ["", "UPPER", "much-too-long", "-dash", "a b"])
def test_names_are_checked(name: str) -> None:
    with pytest.raises(ConfigError):
        KernelMeter(name, 1000)


# A gated namespace (the relay's): it serves one port, uploads on another, and tries elsewhere,
# once from an ephemeral port and once from the port it serves.
_GATED = """
import socket, sys
inner, outer, served, uplink, other, n, m = sys.argv[1:3] + [int(a) for a in sys.argv[3:]]
with socket.create_server((inner, served)) as server:
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.sendall(b"s" * n)
    conn.close()
with socket.create_connection((outer, uplink)) as up:
    up.sendall(b"u" * m)
def attempt(port):
    with socket.socket() as s:
        s.settimeout(2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((inner, port))
        try:
            s.connect((outer, other))
            return "connected"
        except OSError as e:
            return type(e).__name__
print(attempt(0), attempt(served), flush=True)
"""


def test_a_gated_namespace_meters_its_uplink_serves_uncounted_and_reaches_nothing_else(
    missing,
) -> None:
    can = available()
    if not can.ok:
        missing("kernel", f"kernel meter unavailable: {can.reason}")
    served, uplink, other = 7391, 7392, 7393
    km = KernelMeter("test-gate", 10**9, gate=Gate(serves=(served,), connects=(uplink,)))
    km.teardown()
    km.create()
    try:
        with (
            socket.create_server((km.outer_address, uplink)) as sink,
            socket.create_server((km.outer_address, other)) as elsewhere,
        ):
            sink.settimeout(30)
            elsewhere.settimeout(0.1)
            got = [0]
            rx = threading.Thread(target=_receive_all, args=(sink, got))
            rx.start()
            n, m = 50_000, 3_000
            argv = [sys.executable, "-c", _GATED, km.inner_address, km.outer_address,
                    str(served), str(uplink), str(other), str(n), str(m)]  # fmt: skip
            proc = km.popen(argv, stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            with socket.create_connection((km.inner_address, served), timeout=30) as client:
                read = 0
                while data := client.recv(1 << 16):
                    read += len(data)
            attempts = proc.stdout.readline().split()
            proc.wait(timeout=30)
            rx.join()
            with pytest.raises(TimeoutError):
                elsewhere.accept()
        reading = km.read()
    finally:
        km.teardown()
    assert read == n and got[0] == m
    # Only the upload passed the quota, to the byte; the served replies passed beside it.
    assert reading.tcp_payload_bytes == m and reading.dropped_packets == 0
    assert reading.served_bytes > n and reading.served_packets > 0
    # Anywhere else, even from the served port, is dropped: the connection never opens.
    assert attempts == ["TimeoutError", "TimeoutError"], attempts
    assert reading.refused_packets >= 2
