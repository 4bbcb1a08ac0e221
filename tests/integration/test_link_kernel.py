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
from uplimit.link.kernel import KernelMeter, available

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
