"""What a download costs the inner side's kernel quota: the ACKs it sends for downlink bytes.

Downloads are not budgeted by the ledger, but every packet that leaves the inner's namespace
counts against the kernel quota, and TCP acknowledges what it receives. This puts a receiver
in a kernel-meter namespace (as `uplimit serve inner` runs there), sends it N bytes from the
root namespace at a given rate (a rollout sends at 3/4 of `[link] downlink_bytes_per_s`), and
reads the payload-free bytes that left the namespace.

    sudo .venv/bin/python scripts/measure_downlink_acks.py --megabytes 24 --rate 786432
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

from uplimit.link.kernel import KernelMeter, available

_RECEIVE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
n = 0
while chunk := s.recv(1 << 16):
    n += len(chunk)
print(n, flush=True)
"""


def _send(server: socket.socket, total: int, rate: float) -> None:
    conn, _ = server.accept()
    block, sent, start = b"\0" * (1 << 16), 0, time.monotonic()
    with conn:
        while sent < total:
            n = min(len(block), total - sent)
            conn.sendall(block[:n])
            sent += n
            if rate > 0:
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=24.0)
    parser.add_argument("--rate", type=float, default=786_432.0, help="bytes/s; 0: unpaced")
    args = parser.parse_args()
    can = available()
    if not can.ok:
        sys.exit(f"kernel meter unavailable: {can.reason}")
    total = int(args.megabytes * 1e6)
    with KernelMeter("ackmeasure", 1 << 40) as km:
        with socket.create_server((km.outer_address, 0)) as server:
            port = server.getsockname()[1]
            sender = threading.Thread(target=_send, args=(server, total, args.rate))
            sender.start()
            started = time.monotonic()
            received = km.run(
                [sys.executable, "-c", _RECEIVE, km.outer_address, str(port)],
                capture_output=True, text=True, timeout=3600, check=True,
            )  # fmt: skip
            seconds = time.monotonic() - started
            sender.join()
        reading = km.read()
    got = int(received.stdout)
    per_mb = reading.ctl_bytes / (got / 1e6)
    print(
        f"downloaded {got:,} B in {seconds:.1f} s ({got / seconds:,.0f} B/s);"
        f" the inner sent {reading.ctl_packets:,} payload-free packets, {reading.ctl_bytes:,} B"
        f" ({per_mb:,.0f} B per MB downloaded, {reading.ctl_bytes / got:.3%} of the download)"
    )


if __name__ == "__main__":
    main()
