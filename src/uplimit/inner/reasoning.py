"""Reasoning stays inside: split generated tokens into uploaded and withheld ones.

Text between an open and a close marker (e.g. "<think>" ... "</think>") is withheld: it is
generated, kept in the audit store, and never uploaded. Markers are matched on the tokens'
bytes, so they work whether a marker is one special token or spelled by several. A token that
holds any byte of a marker is withheld whole (token boundaries need not align with markers);
a token that could be the start of an open marker is held back until the next tokens settle it.

Sampling noise (exactness, DESIGN.md invariant 5): the decoder guesses the k-th *uploaded*
token with the stream's noise at position k. The inner samples a token outside reasoning with
that same noise (position = uploaded + held-back tokens), so the coupling works for the answer
after a reasoning section too. Tokens inside a section use noise of their own (`WITHHELD`
domain). Held-back tokens that turn out to open a section used positions that the following
uploaded tokens will reach again; reusing a noise draw would bias the sample, so every reuse
of a position gets fresh noise (`NoiseKeys`): exact, and only those few tokens cost more bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from uplimit.wire.request import derive_seed

__all__ = ["NoiseKeys", "Split", "Splitter"]


@dataclass
class Split:
    """What one pushed token changed."""

    uploaded: list[int] = field(default_factory=list)  # released for upload, in order
    withheld: list[int] = field(default_factory=list)  # newly withheld, in order


class Splitter:
    """Per-candidate state machine over generated tokens (module doc)."""

    def __init__(
        self, markers: tuple[str, str] | None, token_bytes: Callable[[int], bytes]
    ) -> None:
        self._open, self._close = (m.encode() for m in markers) if markers else (b"", b"")
        self._bytes = token_bytes
        self.inside = False
        self.held: list[int] = []  # tokens that may start an open marker
        self._section = b""  # bytes of the current section after its open marker

    @property
    def enabled(self) -> bool:
        return bool(self._open)

    def push(self, token: int) -> Split:
        if not self.enabled:
            return Split(uploaded=[token])
        if self.inside:
            return self._push_inside(token)
        self.held.append(token)
        pieces = [self._bytes(t) for t in self.held]
        buf = b"".join(pieces)
        at = buf.find(self._open)
        if at >= 0:
            start, n = 0, 0
            while start + len(pieces[n]) <= at:  # tokens wholly before the marker
                start += len(pieces[n])
                n += 1
            split = Split(uploaded=self.held[:n], withheld=self.held[n:])
            self.held = []
            self.inside = True
            self._section = buf[at + len(self._open) :]
            self._close_if_done()
            return split
        tail = _partial_tail(buf, self._open)
        n_keep, covered = 0, 0  # the fewest last tokens that cover the tail
        while covered < tail:
            n_keep += 1
            covered += len(pieces[-n_keep])
        cut = len(self.held) - n_keep
        split = Split(uploaded=self.held[:cut])
        self.held = self.held[cut:]
        return split

    def flush(self) -> list[int]:
        """At the end of generation: held-back tokens were not a marker after all."""
        out, self.held = self.held, []
        return out

    def _push_inside(self, token: int) -> Split:
        self._section += self._bytes(token)
        self._close_if_done()
        return Split(withheld=[token])

    def _close_if_done(self) -> None:
        if self._close in self._section:
            self.inside = False
            self._section = b""


def _partial_tail(buf: bytes, marker: bytes) -> int:
    for k in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-k:]):
            return k
    return 0


class NoiseKeys:
    """Which (seed, position) each sampled token's Gumbel noise comes from (module doc)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._withheld_seed = derive_seed(seed, "withheld")
        self._withheld = 0
        self._uses: dict[int, int] = {}  # uploaded position -> draws made at it so far

    def uploaded(self, position: int) -> tuple[int, int]:
        uses = self._uses.get(position, 0)
        self._uses[position] = uses + 1
        return (self.seed if uses == 0 else derive_seed(self.seed, "reuse", position, uses)), (
            position
        )

    def withheld(self) -> tuple[int, int]:
        self._withheld += 1
        return self._withheld_seed, self._withheld - 1

    def predict(self, inside: bool, position: int, ahead: int) -> tuple[int, int]:
        """The key that the token `ahead` places after the next one will get, if no reasoning
        section opens or closes meanwhile; uses up nothing (for a speculative draft's guess)."""
        if inside:
            return self._withheld_seed, self._withheld + ahead
        position += ahead
        uses = self._uses.get(position, 0)
        return (self.seed if uses == 0 else derive_seed(self.seed, "reuse", position, uses)), (
            position
        )
