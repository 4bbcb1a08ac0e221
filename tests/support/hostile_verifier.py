"""A hostile spot-check verifier, as its own process: it tries to signal to the outer through
the feed's connection. Usage: python hostile_verifier.py PORT MODE... (one mode per
connection, in order; then "close"). It prints "conn N MODE" for each connection it takes.

Modes, each done at a random moment within the second after the connection is accepted:
close (FIN), reset (RST), write (bytes to the outer), stall (stop reading, with a tiny buffer).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import sys
import time


def main() -> None:
    port, modes = int(sys.argv[1]), sys.argv[2:]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # inherited: stalls fast
    listener.bind(("127.0.0.1", port))
    listener.listen()
    held = []
    for n in range(1_000_000):
        conn, _ = listener.accept()
        mode = modes[n] if n < len(modes) else "close"
        print(f"conn {n} {mode}", flush=True)
        time.sleep(random.random())
        if mode == "close":  # a FIN: what is unread would make it a reset
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while conn.recv(1 << 16):
                    pass
            conn.shutdown(socket.SHUT_WR)
            held.append(conn)
        elif mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        elif mode == "write":
            conn.sendall(b"a signal from the inner side")
            held.append(conn)
        elif mode == "stall":
            held.append(conn)  # never read
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
