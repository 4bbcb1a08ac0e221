"""Attack 1, meter bypass: an inner process that writes the uplink socket itself.

Run as its own process (`python -m uplimit.redteam.flood ...`), inside a kernel meter's
namespace when there is one, so the kernel quota is what it meets. It does the handshake as a
real inner would (reads HELLO, answers accept with the outer's fingerprint digest), then
writes the secret as length-prefixed frames as fast as the socket takes them, with no ledger
and no ticks. Prints `sent N`: payload bytes the kernel accepted from it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from uplimit.wire.protocol import MAX_CHARGED_BYTES, Accept, Frame, LedgerReport, encode_uplink


def flood(
    host: str, downlink_port: int, uplink_port: int, digest: bytes, secret: bytes, chunk: int
) -> int:
    down = socket.create_connection((host, downlink_port), timeout=10)
    down.recv(1 << 16)  # preamble and HELLO: the outer now takes the uplink
    up = socket.create_connection((host, uplink_port), timeout=10)
    up.settimeout(3)  # past the kernel quota nothing is acknowledged: the buffer stays full
    sent = 0
    try:
        up.sendall(encode_uplink(Accept(digest)))
        # The ledger report is the inner's claim: a bypass claims whatever passes the check.
        up.sendall(encode_uplink(LedgerReport(bytes(16), MAX_CHARGED_BYTES, True)))
        for i in range(0, len(secret), chunk):
            up.sendall(encode_uplink(Frame(secret[i : i + chunk])))
            sent += min(chunk, len(secret) - i)
    except OSError:
        pass
    finally:
        up.close()
        down.close()
    return sent


def main(argv: list[str]) -> None:
    host, dport, uport, digest_hex, secret_path, chunk = argv
    secret = Path(secret_path).read_bytes()
    sent = flood(host, int(dport), int(uport), bytes.fromhex(digest_hex), secret, int(chunk))
    print("sent", sent, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
