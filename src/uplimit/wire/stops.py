"""Stop sequences, matched alike on both sides in the bytes of the uploaded tokens.

The inner stops generating and ends the stream after the token that completes a stop; the
outer, fed the same tokens, stops at the same token and trims the text. The limits on stop
sequences are `wire.request`'s (MAX_STOPS, MAX_STOP_BYTES).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Finds the first stop sequence in a byte stream fed piece by piece.

    `feed` returns the bytes that are safe to show: everything before a stop, and never a tail
    that could still become one (held back until the next piece settles it).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s.encode() for s in stops]
        self._longest = max(map(len, self._stops), default=0)
        self._held = b""
        self.stopped = False

    def feed(self, piece: bytes) -> bytes:
        if self.stopped:
            return b""
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = b""
            return buf[: min(hits)]
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> bytes:
        """At the end of the stream: the held-back tail was not a stop after all."""
        out, self._held = self._held, b""
        return out

    def _partial(self, buf: bytes) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some stop."""
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
